"""Checkpoint size of a one-step embedded GRPO fit (``configs/embedded/rule.yaml``), full fine-tuning and LoRA.

    python benchmarks/checkpoint_size.py --target .cache/rerule/embedded/target --world .cache/rerule/embedded/world

Runs ``rerule fit`` (the shipped config, plus ``configs/peft/lora.yaml`` for LoRA) for one step with a
``ModelCheckpoint`` and prints, per mode, the checkpoint's size, its number of state-dict keys, the keys' tensor
bytes and the trainable parameters' bytes. The ``rerule_lightning`` on ``PYTHONPATH`` is the one measured, so
pointing it at an older checkout measures the size before a change.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_fit(peft: str, target: str, world: str, tmp: Path) -> dict:
    overlay = tmp / f"{peft}.yaml"
    overlay.write_text("trainer:\n  enable_checkpointing: true\n  callbacks:\n"
                       "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
                       f"      init_args: {{dirpath: {tmp / peft}, every_n_train_steps: 1, save_top_k: -1}}\n")
    cmd = [sys.executable, "-m", "rerule_lightning.cli", "fit", "--config", str(ROOT / "configs/embedded/rule.yaml")]
    if peft == "lora":
        cmd += ["--config", str(ROOT / "configs/peft/lora.yaml")]
    cmd += ["--config", str(overlay), "--model.init_args.policy.name_or_path", target,
            "--data.init_args.world_dir", world, "--data.init_args.batch_size", "2",
            "--model.init_args.num_generations", "2", "--model.init_args.max_new_tokens", "4",
            "--model.init_args.export_dir", "null", "--trainer.max_steps", "1", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp / f"{peft}_root")]
    # cwd outside the checkout: ``python -m`` puts the cwd first on sys.path, which would shadow PYTHONPATH
    subprocess.run(cmd, check=True, cwd=tmp, capture_output=True, text=True)
    path = next((tmp / peft).glob("*.ckpt"))
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    sd = ckpt["state_dict"]
    storages = {v.untyped_storage().data_ptr(): v.untyped_storage().nbytes() for v in sd.values()}
    return {"peft": peft, "file_bytes": os.path.getsize(path), "state_dict_keys": len(sd),
            "state_dict_tensor_bytes": sum(storages.values()),
            "reference_keys": sum(k.startswith("ref_model.") for k in sd),
            "lora_keys": sum("lora_" in k for k in sd)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default=".cache/rerule/embedded/target")
    p.add_argument("--world", default=".cache/rerule/embedded/world")
    p.add_argument("--json", default=None, help="also write the rows here")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [one_fit(peft, os.path.abspath(a.target), os.path.abspath(a.world), Path(tmp))
                for peft in ("full", "lora")]
    for r in rows:
        print(f"{r['peft']:5s} file {r['file_bytes'] / 2**20:8.2f} MiB  keys {r['state_dict_keys']:4d}  "
              f"state tensors {r['state_dict_tensor_bytes'] / 2**20:8.2f} MiB  ref_model keys {r['reference_keys']}"
              f"  lora keys {r['lora_keys']}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
