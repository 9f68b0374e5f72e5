"""Evaluation during fit/validate under DDP (2 CPU processes) gives the single-process metric values."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import lightning as L

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from ddp_eval_worker import build  # noqa: E402


def test_validation_metrics_equal_in_one_and_two_processes(tiny_prepared, tmp_path, one_torch_thread):
    links = tiny_prepared["links"]
    module, data = build(links["world"], links["target"], links["retain"])
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.validate(module, datamodule=data, verbose=False)
    single = {k: float(v) for k, v in trainer.callback_metrics.items()}

    out = tmp_path / "ddp.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "ddp_eval_worker.py"), links["world"], links["target"],
                           links["retain"], str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ddp = json.load(open(out))
    for key in ("forget/answer_accuracy", "forget/refusal_rate", "forget/forget_quality", "forget/mia_auc",
                "boundary_hard/rouge_l_recall", "boundary_hard/probability", "forget/truth_ratio"):
        assert key in single and key in ddp, key
    assert set(single) == set(ddp)
    for k, v in single.items():
        if math.isnan(v):
            assert math.isnan(ddp[k]), k
        else:
            assert math.isclose(v, ddp[k], rel_tol=1e-6, abs_tol=1e-9), (k, v, ddp[k])
