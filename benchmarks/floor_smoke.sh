#!/usr/bin/env bash
# Build a virtual environment at the dependency floors of pyproject.toml (every ">=X" installed as "==X") and
# run a small smoke set in it: LoRA + gradient checkpointing (gradient and fit), QLoRA fit, micro-batching,
# lean checkpoints, rollout sampling, open rewards, evaluation, the GPU check's CPU path and the entry point, on a
# tiny world prepared afresh with those versions.
#
#   bash benchmarks/floor_smoke.sh [VENV_DIR] > smoke.log 2>&1      # default VENV_DIR: /tmp/rerule-floor-venv
#
# torch is installed first at TORCH_VERSION (default 2.13.0, the build on the dev machine): its own floor is not
# exercised. The versions installed are written to VENV_DIR/freeze.txt.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${1:-/tmp/rerule-floor-venv}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
PY="${PYTHON:-python3}"

rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "torch==$TORCH_VERSION"
PINS=$("$PY" - "$ROOT/pyproject.toml" <<'PYEOF'
import re, sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
print(" ".join(re.sub(r"\s*>=\s*", "==", d.split(";")[0]).strip() for d in deps if not re.match(r"torch\s*(>|=|$)", d)))
PYEOF
)
echo "floor pins: $PINS"
# shellcheck disable=SC2086
"$VENV/bin/pip" install -q $PINS "torch==$TORCH_VERSION" pytest
"$VENV/bin/pip" install -q --no-deps --no-build-isolation -e "$ROOT" 2>/dev/null \
  || echo "(editable install skipped; PYTHONPATH points at the checkout)"
"$VENV/bin/pip" freeze > "$VENV/freeze.txt"
echo "installed:"; grep -iE "^(torch|lightning|transformers|peft|accelerate|bitsandbytes|datasets|tokenizers|huggingface.hub|numpy)==" "$VENV/freeze.txt"

cd "$ROOT"
export PYTHONPATH="$ROOT" OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 RERULE_TEST_CACHE="$VENV/test-cache"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -rs \
  tests/test_gradient_checkpointing.py \
  "tests/test_grpo_module.py::test_lora_fit_trains_adapters_only_and_reference_is_the_base" \
  "tests/test_grpo_module.py::test_qlora_fit_trains_lora_weights" \
  tests/test_micro_batch.py tests/test_lean_checkpoints.py tests/test_rollout_sampling.py \
  tests/test_open_rewards.py tests/test_evaluator.py tests/test_gpu_check.py tests/test_cli_entry.py
