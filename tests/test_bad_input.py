"""Bad input, systematically: malformed configs, flags, world parameters, world files and checkpoints each fail
through the ``rerule`` entry point before training, with exit status 2, one ``rerule: error:`` line naming the
file / row / field / flag (a config or flag error as ``--key=value: reason``; no usage text, no dump of the
resolved ``Namespace``), no traceback, no partial output (export dir, checkpoints, eval.json, config.yaml) and no
MLflow run at all."""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from test_safe_loading import Payload, tiny_checkpoint

from rerule_lightning.cli.commands import main

ROOT = Path(__file__).resolve().parents[1]
RULE = ROOT / "configs" / "embedded" / "rule.yaml"
PREPARE = ROOT / "configs" / "embedded" / "prepare.yaml"
HARD_CASE = ROOT / "configs" / "replay" / "hard_case.yaml"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass
class Env:
    """What a case can use: the tiny world / model, a real checkpoint, and its own scratch directory."""

    world: str
    target: str
    ckpt: Path
    tmp: Path
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- input builders
def yaml_file(text: str | bytes) -> Callable[[Env], list[str]]:
    def build(env: Env) -> list[str]:
        p = env.tmp / "bad.yaml"
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        return ["--config", str(p)]
    return build


def flags(*args: str) -> Callable[[Env], list[str]]:
    return lambda env: list(args)


def world_with(split: str, edit: Callable[[list[dict]], list[dict]]) -> Callable[[Env], list[str]]:
    """A copy of the tiny world whose ``split`` rows were edited (saved with HF datasets, like prepare does)."""
    def build(env: Env) -> list[str]:
        from datasets import Dataset, load_from_disk

        dd = load_from_disk(env.world)
        dd[split] = Dataset.from_list(edit([dict(r) for r in dd[split]]))
        out = env.tmp / "world"
        dd.save_to_disk(str(out))
        shutil.copy(Path(env.world) / "world_config.json", out / "world_config.json")
        return ["--data.init_args.world_dir", str(out)]
    return build


def world_file_bytes(relpath: str, data: bytes) -> Callable[[Env], list[str]]:
    def build(env: Env) -> list[str]:
        out = env.tmp / "world"
        shutil.copytree(env.world, out)
        (out / relpath).write_bytes(data)
        return ["--data.init_args.world_dir", str(out)]
    return build


def ckpt_from(make: Callable[[Env, Path], None]) -> Callable[[Env], list[str]]:
    def build(env: Env) -> list[str]:
        p = env.tmp / "given.ckpt"
        make(env, p)
        return ["--ckpt_path", str(p)]
    return build


def _truncate(env: Env, p: Path) -> None:
    data = env.ckpt.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _other_model(env: Env, p: Path) -> None:
    ckpt = torch.load(env.ckpt, weights_only=True)
    ckpt["state_dict"] = {k: torch.zeros(*[d + 1 for d in v.shape]) if v.dim() else v
                          for k, v in ckpt["state_dict"].items()}
    ckpt["state_dict"]["model.extra_head.weight"] = torch.zeros(2, 2)
    torch.save(ckpt, p)


def _pickled(env: Env, p: Path) -> None:
    ckpt = torch.load(env.ckpt, weights_only=True)
    ckpt["payload"] = Payload(str(env.tmp / "payload-ran"))
    torch.save(ckpt, p)


def _rows(edit: Callable[[dict], None], index: int = 0) -> Callable[[list[dict]], list[dict]]:
    def apply(rows: list[dict]) -> list[dict]:
        edit(rows[index])
        return rows
    return apply


def _set(key: str, value: Any) -> Callable[[dict], None]:
    return lambda r: r.__setitem__(key, value)


def _columns(fn: Callable[[dict], dict]) -> Callable[[list[dict]], list[dict]]:
    return lambda rows: [fn(r) for r in rows]


# ----------------------------------------------------------------------------- the table
#: (id, command, input builder, pattern the stderr must contain)
CASES: list[tuple[str, str, Callable[[Env], list[str]], str]] = [
    # configs: YAML
    ("yaml_unknown_key", "fit", yaml_file("model:\n  init_args:\n    num_generationz: 4\n"), r"--model\.init_args\.num_generationz: not an option of "),
    ("yaml_wrong_type", "fit", yaml_file("model:\n  init_args:\n    num_generations: eight\n"),
     r"--model\.init_args\.num_generations=eight: expected int"),
    ("yaml_missing_model", "fit-bare", yaml_file(yaml.safe_dump({"data": yaml.safe_load(RULE.read_text())["data"]})),
     r"--model: required"),
    ("yaml_null_model_path", "fit", yaml_file("model:\n  init_args:\n    policy:\n      name_or_path: null\n"),
     r"--model\.init_args\.policy\.name_or_path is None"),
    ("yaml_non_utf8", "fit", yaml_file(b"model:\n  init_args:\n    reward: r\xff\xfe\n"),
     r"bad\.yaml: not valid UTF-8 \(line 3"),
    ("yaml_python_tag", "fit", yaml_file("seed_everything: !!python/object/apply:os.getcwd []\n"),
     r"python/object/apply"),
    ("yaml_replay_capacity_0", "fit", yaml_file(HARD_CASE.read_text().replace("capacity: 256", "capacity: 0")),
     r"--trainer\.callbacks\.init_args\.capacity=0: must be >= 1 \(HardCaseReplayCallback\)"),
    ("config_file_missing", "fit", flags("--config", "/nonexistent/rule.yaml"), r"/nonexistent/rule\.yaml"),
    # configs: flags
    ("flag_negative_batch_size", "fit", flags("--data.init_args.batch_size", "-2"), r"--data\.init_args\.batch_size=-2: must be >= 1"),
    ("flag_num_generations_1", "fit", flags("--model.init_args.num_generations", "1"), 
     r"--model\.init_args\.num_generations=1: GRPO needs at least 2 completions per prompt$"),
    ("flag_unknown_loss_type", "fit", flags("--model.init_args.loss_type", "ppo"), r"--model\.init_args\.loss_type=ppo: expected one of"),
    ("flag_max_new_tokens_0", "fit", flags("--model.init_args.max_new_tokens", "0"), r"--model\.init_args\.max_new_tokens=0: must be >= 1"),
    ("flag_forget_fraction", "fit", flags("--data.init_args.forget_fraction", "1.5"), r"--data\.init_args\.forget_fraction=1\.5: must be in"),
    ("flag_unknown_preset", "fit", flags("--data.init_args.preset", "medium"), r"--data\.init_args\.preset=medium: expected one of 'easy', 'hard'"),
    ("flag_unknown_eval_split", "fit", flags("--data.init_args.eval_splits", "[forget,nope]"), r"--data\.init_args\.eval_splits: unknown split\(s\) \['nope'\]"),
    ("flag_world_dir_missing", "fit", flags("--data.init_args.world_dir", "/nonexistent/world"),
     r"/nonexistent/world"),
    ("flag_model_dir_missing", "fit", flags("--model.init_args.policy.name_or_path", "/nonexistent/model"),
     r"--model\.init_args\.policy\.name_or_path='/nonexistent/model'"),
    ("flag_generation_beyond_context", "fit", flags("--model.init_args.max_new_tokens", "200"),
     r"prompt '[^']+' .* --model\.init_args\.max_new_tokens=200 .* max_position_embeddings=96"),
    ("flag_eval_generation_beyond_context", "validate", flags("--model.init_args.eval_max_new_tokens", "500"),
     r"--model\.init_args\.eval_max_new_tokens=500"),
    # world parameters (rerule prepare)
    ("world_negative_families", "prepare", flags("--world.num_families", "-1"), r"num_families=-1"),
    ("world_too_many_families", "prepare", flags("--world.num_boundary_easy_families", "40"),
     r"num_forget_families \+ num_boundary_easy_families"),
    ("world_epochs_0", "prepare", flags("--target_training.epochs", "0"), r"target_training\.epochs=0"),
    ("world_wrong_type", "prepare", flags("--world.seed", "abc"), r"--world\.seed=abc: expected int"),
    # world files
    ("file_missing_field", "fit", world_with("rl_prompts_hard", _columns(lambda r: {k: v for k, v in r.items()
                                                                                     if k != "prompt_text"})),
     r"rl_prompts_hard'? lacks field\(s\) \['prompt_text'\]"),
    ("file_wrong_type", "fit", world_with("rl_prompts_hard", _columns(lambda r: {**r, "prompt_text": 7})),
     r"rl_prompts_hard'? field 'prompt_text' has type int64, expected string"),
    ("file_empty_string", "fit", world_with("rl_prompts_hard", _rows(_set("prompt_text", "  "), 3)),
     r"rl_prompts_hard'? row 3 \(id '[^']+'\) field 'prompt_text' is empty"),
    ("file_empty_answer", "fit", world_with("forget", _rows(_set("answer", ""), 1)),
     r"forget'? row 1 \(id '[^']+'\) field 'answer' is empty"),
    ("file_bad_label", "fit", world_with("rl_prompts_hard", _rows(_set("label", "maybe"), 2)),
     r"row 2 .* field 'label' is 'maybe'"),
    ("file_duplicate_ids", "fit", world_with("rl_prompts_hard", lambda rows: rows + [dict(rows[0])]),
     r"field 'id': duplicate id '[^']+' \(also row 0\)"),
    ("file_non_utf8", "fit", world_file_bytes("dataset_dict.json", b'{"splits": ["forget\xff"]}'),
     r"dataset_dict\.json: not valid UTF-8"),
    ("file_bad_json", "fit", world_file_bytes("forget/state.json", b'{"_data_files": ['),
     r"forget/state\.json: not valid JSON"),
    ("file_overlong_prompt", "fit", world_with("rl_prompts_hard",
                                               _rows(_set("prompt_text", "Where was " + "Ann " * 150 + "born?"), 0)),
     r"prompt '[^']+' in .*world \(RL prompts\) has \d+ tokens; with --model\.init_args\.max_new_tokens=4"),
    # checkpoints
    ("ckpt_truncated", "fit", ckpt_from(_truncate), r"given\.ckpt' is truncated"),
    ("ckpt_empty", "fit", ckpt_from(lambda env, p: p.write_bytes(b"")), r"given\.ckpt' is empty"),
    ("ckpt_not_a_checkpoint", "fit", ckpt_from(lambda env, p: torch.save([1, 2, 3], p)),
     r"given\.ckpt' is not a Lightning checkpoint"),
    ("ckpt_text_file", "fit", ckpt_from(lambda env, p: p.write_text("not a checkpoint")),
     r"given\.ckpt' is truncated or not a torch checkpoint"),
    ("ckpt_pickle_payload", "fit", ckpt_from(_pickled), r"given\.ckpt' refused: it holds pickled Python objects"),
    ("ckpt_missing", "fit", flags("--ckpt_path", "/nonexistent/x.ckpt"), r"--ckpt_path /nonexistent/x\.ckpt"),
    ("ckpt_other_model", "fit", ckpt_from(_other_model),
     r"given\.ckpt' is from a different model .*unexpected \['model\.extra_head\.weight'\]"),
]


@pytest.fixture(scope="module")
def real_ckpt(tiny_prepared: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tiny_prepared, tmp_path_factory.mktemp("bad-input-ckpt"), steps=1)


def base_args(command: str, env: Env) -> list[str]:
    out = env.tmp / "out"
    if command == "prepare":
        return ["prepare", "--config", str(PREPARE), "--cache_dir", str(out / "cache"), "--progress", "false"]
    if command == "fit-bare":
        return ["fit", "--trainer.default_root_dir", str(out / "logs")]
    if command == "prepare-tiny":  # the tiny world, its cached world and tokenizer: nothing new is built
        from conftest import TINY_MODEL, TINY_WORLD

        sizes = [a for k, v in {**{f"world.{k}": v for k, v in TINY_WORLD.items()},
                                **{f"model.{k}": v for k, v in TINY_MODEL.items()}}.items() for a in (f"--{k}", str(v))]
        return ["prepare", "--cache_dir", env.extra["cache_dir"], "--vocab_size", "512", "--progress", "false",
                "--report", "false", *sizes]
    if command == "demo":
        return ["demo", "--output_dir", str(out / "demo"), "--cache_dir", str(out / "cache"),
                "--tracking_uri", f"sqlite:///{env.tmp / 'mlflow.db'}"]
    if command == "report":
        return ["report", "--output_dir", str(out / "report")]
    if command == "fit-rs":
        return ["fit", "--config", str(ROOT / "configs" / "embedded" / "rs.yaml"),
                "--model.init_args.policy.name_or_path", env.target, "--data.init_args.world_dir", env.world,
                "--data.init_args.tokenizer", env.target, "--model.init_args.export_dir", str(out / "export"),
                "--trainer.max_steps", "1", "--trainer.default_root_dir", str(out / "logs"),
                "--trainer.logger.init_args.tracking_uri", f"sqlite:///{env.tmp / 'mlflow.db'}"]
    return [command, "--config", str(RULE),
            "--model.init_args.policy.name_or_path", env.target, "--data.init_args.world_dir", env.world,
            "--data.init_args.batch_size", "2", "--model.init_args.num_generations", "2",
            "--model.init_args.max_new_tokens", "4", "--model.init_args.export_dir", str(out / "export"),
            "--model.init_args.eval_report_path", str(out / "eval.json"),
            "--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(out / "logs"),
            "--trainer.logger.init_args.tracking_uri", f"sqlite:///{env.tmp / 'mlflow.db'}"]


def run_statuses(db: Path) -> list[str]:
    if not db.exists():
        return []
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exps = [e.experiment_id for e in client.search_experiments()]
    return [r.info.status for r in client.search_runs(exps)]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_early_naming_the_culprit(case: tuple, tiny_prepared: dict, real_ckpt: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    line = check_fails_early(case, tiny_prepared, real_ckpt, tmp_path, capsys, monkeypatch)
    assert line.startswith("rerule: error: ") and re.search(case[3], line), line


def check_fails_early(case: tuple, tiny_prepared: dict, ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                      monkeypatch: pytest.MonkeyPatch) -> str:
    """Run one case through ``rerule`` in-process and check how it fails (see the module docstring). With
    ``$RERULE_BAD_INPUT_TIMES`` set, appends ``case, command, seconds to fail`` to that file (the table of
    benchmarks/bad_input_times.py). Returns the one error line."""
    name, command, build, pattern = case
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RERULE_DEBUG", raising=False)
    links = tiny_prepared["links"]
    env = Env(world=links["world"], target=links["target"], ckpt=ckpt, tmp=tmp_path,
              extra={"cache_dir": str(Path(tiny_prepared["paths"]["world"]).parent)})
    argv = base_args(command, env)
    extra = build(env)
    argv = argv[:1] + extra + argv[1:] if command == "fit-bare" else argv + extra
    capsys.readouterr()
    t0 = time.perf_counter()
    try:
        rc = main(argv)
    except SystemExit as e:  # jsonargparse reports parse errors itself, with status 2
        rc = e.code
    seconds = time.perf_counter() - t0
    if os.environ.get("RERULE_BAD_INPUT_TIMES"):
        with open(os.environ["RERULE_BAD_INPUT_TIMES"], "a", encoding="utf-8") as f:
            f.write(f"{name},{command},{seconds:.3f}\n")
    err = capsys.readouterr().err
    assert rc == 2, f"{name}: exit status {rc}, stderr:\n{err[-2000:]}"
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and lines[0].startswith("rerule: error: "), f"{name}: not one error line:\n{err[-2000:]}"
    assert re.search(pattern, lines[0]), f"{name}: the error line does not match {pattern!r}:\n{lines[0]}"
    for noise in ("Traceback", "Namespace(", "usage:", "Union subtypes"):
        assert noise not in err, f"{name}: {noise!r} reached the user:\n{err[-2000:]}"
    out = tmp_path / "out"
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.exists() else []
    leftovers = [p for p in left if not p.startswith("logs") or p.endswith((".ckpt", ".safetensors", "eval.json"))]
    assert not leftovers, f"{name}: partial output left behind: {leftovers}"
    assert not list(out.rglob("*.ckpt")) and not (out / "export").exists() and not (out / "eval.json").exists()
    # every check, also the one that needs the weights (a checkpoint of another model), runs before Lightning
    # starts, so no MLflow run (not even a FAILED one) and no config.yaml exist
    assert run_statuses(tmp_path / "mlflow.db") == [], f"{name}: MLflow runs were created"
    assert not list(tmp_path.rglob("config.yaml")), f"{name}: a config.yaml was written"
    assert not (tmp_path / "payload-ran").exists()
    return lines[0]


def test_the_table_is_large_and_covers_every_kind_of_input() -> None:
    assert len(CASES) >= 25
    kinds = {c[0].split("_")[0] for c in CASES}
    assert {"yaml", "flag", "world", "file", "ckpt"} <= kinds



def test_debug_keeps_jsonargparse_full_text(tiny_prepared: dict, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from rerule_lightning.cli.lightning_cli import ConfigError

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RERULE_DEBUG", "1")
    links = tiny_prepared["links"]
    env = Env(world=links["world"], target=links["target"], ckpt=tmp_path / "unused.ckpt", tmp=tmp_path)
    argv = base_args("fit", env) + ["--model.init_args.reward", "nope"]  # a constructor's own check
    with pytest.raises(ConfigError) as info:  # raised, not printed: the traceback shows both texts
        main(argv)
    assert str(info.value).startswith("--model.init_args.reward='nope': unknown reward")
    full = str(info.value.__cause__)
    assert "Does not validate against any of the Union subtypes" in full and "Given value" in full
