"""The step profiler's bookkeeping: exclusive time per category, the rest, medians (a fake clock)."""

from __future__ import annotations

import importlib.util
import os

import pytest

PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "step_profile.py")


@pytest.fixture()
def sp(monkeypatch: pytest.MonkeyPatch):
    spec = importlib.util.spec_from_file_location("step_profile", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    clock = [0.0]
    monkeypatch.setattr(mod.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(mod.time, "process_time", lambda: clock[0] / 4)  # the process got a quarter of a core
    mod.clock = clock
    return mod


def test_nested_calls_count_exclusive_time_and_the_rest(sp) -> None:
    timer = sp.StepTimer()

    def tick(dt: float) -> None:
        sp.clock[0] += dt

    ref = timer.wrap(lambda: tick(2.0), "reference log-probs")

    def replay_inputs() -> None:  # 1 s of its own, a 2 s reference pass inside, 3 s more of its own
        tick(1.0)
        ref()
        tick(3.0)

    seq = timer.wrap(lambda reference=False: tick(0.5), lambda reference=False: "reference log-probs"
                     if reference else "forward")
    step = timer.wrap_step(lambda: (timer.wrap(replay_inputs, "replay bookkeeping")(), seq(), seq(reference=True),
                                    tick(5.0)))
    step()
    rec = timer.steps[0]
    assert rec["replay bookkeeping"] == 4.0 and rec["reference log-probs"] == 2.5 and rec["forward"] == 0.5
    assert rec["total"] == 12.0 and rec["rest"] == 5.0 and rec["generation"] == 0.0
    cpu = timer.cpu_steps[0]  # the same bookkeeping on the CPU clock
    assert cpu["replay bookkeeping"] == 1.0 and cpu["reference log-probs"] == 0.625 and cpu["forward"] == 0.125
    assert cpu["total"] == 3.0 and cpu["rest"] == 1.25


def test_summary_medians_and_non_core_share(sp) -> None:
    zero = dict.fromkeys(sp.CATEGORIES, 0.0)
    steps = [{**zero, "generation": g, "reference log-probs": r, "logging": 0.1, "total": g + r + 0.1}
             for g, r in [(1.0, 0.2), (2.0, 0.4), (3.0, 0.3)]]
    med = sp.summarise(steps)
    # totals 1.3, 2.5, 3.4: each category's median over steps, shares of the median total 2.5
    assert med["generation"] == 2.0 and med["reference log-probs"] == 0.3 and med["total"] == pytest.approx(2.5)
    assert med["overhead_share"] == pytest.approx(0.16)  # (reference 0.3 + logging 0.1) / 2.5
    assert med["overhead_share_ref_as_forward"] == pytest.approx(0.04)  # logging 0.1 / 2.5
