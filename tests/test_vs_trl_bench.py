"""benchmarks/vs_trl.py: the prompt padding, the model copy for long prompts, and one tiny alternated run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import vs_trl


def test_prompts_are_padded_to_about_the_asked_length(tiny_prepared: dict) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_prepared["links"]["target"])
    prompt = "Question: Where was Orla Venn born?\nAnswer:"
    assert vs_trl.prefixer(tok, 0)(prompt) == prompt
    padded = vs_trl.prefixer(tok, 128)(prompt)
    assert padded.endswith(prompt)
    n = len(tok(padded)["input_ids"])
    assert 120 <= n <= 136, n  # decode / re-encode of the filler may merge a few tokens at the seam


def test_the_model_is_copied_only_when_its_positions_are_too_few(tiny_prepared: dict, tmp_path: Path) -> None:
    target = tiny_prepared["links"]["target"]
    n = json.loads((Path(target) / "config.json").read_text())["max_position_embeddings"]
    assert vs_trl.model_copy(target, n - vs_trl.T - 8, str(tmp_path)) == target
    copy = vs_trl.model_copy(target, n + 100, str(tmp_path))
    assert copy != target
    assert json.loads((Path(copy) / "config.json").read_text())["max_position_embeddings"] == n + 100 + vs_trl.T + 8


@pytest.mark.slow
def test_one_alternated_repeat_times_every_side(tiny_prepared: dict, tmp_path: Path, one_torch_thread: None,
                                                capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("trl")
    out = tmp_path / "r.json"
    assert vs_trl.main(["--repeats", "1", "--steps", "1", "--unshared", "--model", tiny_prepared["links"]["target"],
                        "--world_dir", tiny_prepared["links"]["world"], "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    (run,) = res["runs"]
    for side in ("ours", "trl", "unshared"):
        assert len(run[side]["steps_s"]) == 2 and run[side]["median_s"] > 0  # warm-up + one timed step
        assert run[side]["completion_tokens"] > 0
    assert res["summary"]["median_ratio"] == pytest.approx(run["ours"]["median_s"] / run["trl"]["median_s"])
    assert "our step / TRL's" in capsys.readouterr().out


def test_bad_arguments_fail_before_any_work() -> None:
    with pytest.raises(SystemExit):
        vs_trl.main(["--repeats", "0"])


@pytest.mark.slow
def test_prefix_share_parts_times_both_paths(tiny_prepared: dict, one_torch_thread: None,
                                             capsys: pytest.CaptureFixture) -> None:
    from benchmarks import prefix_share_parts

    assert prefix_share_parts.main(["--repeats", "1", "--model", tiny_prepared["links"]["target"],
                                    "--world_dir", tiny_prepared["links"]["world"]]) == 0
    out = capsys.readouterr().out
    assert "generation prefill_once / today = " in out and "policy pass shared / full = " in out
