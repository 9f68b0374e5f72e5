"""Input checks that run before any training: saved world files, prompt lengths, checkpoints to resume.

Every check raises ``ValueError`` (or ``FileNotFoundError``) whose message names the file, the split and
row, the field, and the flag to change; the CLI prints it as one ``rerule: error: ...`` line (exit 2).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

#: Columns of a fact split (forget, boundary_*, retain, holdout, world_facts) -> (type, must be non-empty).
FACT_FIELDS: dict[str, tuple[str, bool]] = {
    "id": ("string", True), "questions": ("list[string]", True), "answer": ("string", True),
    "paraphrased_answer": ("string", True), "perturbed_answer": ("list[string]", True),
    "value": ("string", True), "author": ("string", False),
}
#: Columns of an RL prompt split (rl_prompts, rl_prompts_easy, rl_prompts_hard).
PROMPT_FIELDS: dict[str, tuple[str, bool]] = {
    "id": ("string", True), "prompt_text": ("string", True), "label": ("string", True), "kind": ("string", True),
    "reference": ("string", False), "target": ("string", False), "value": ("string", False),
}
PROMPT_LABELS = ("forget", "boundary")


def check_json_files(root: str) -> None:
    """Every ``*.json`` in ``root`` and its direct sub-directories is UTF-8 and parses.

    Raises:
        ValueError: Naming the file and the byte offset / JSON error.
    """
    for path in sorted(glob.glob(os.path.join(root, "*.json")) + glob.glob(os.path.join(root, "*", "*.json"))):
        raw = open(path, "rb").read()
        try:
            json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None


def _feature_type(feature: Any) -> str:
    dtype = getattr(feature, "dtype", None)
    if dtype is not None and not hasattr(feature, "feature"):
        return "string" if dtype in ("string", "large_string") else str(dtype)
    inner = getattr(feature, "feature", None)
    return f"list[{_feature_type(inner)}]" if inner is not None else type(feature).__name__


def split_errors(name: str, features: Mapping[str, Any], rows: Iterable[Mapping[str, Any]],
                 fields: Mapping[str, tuple[str, bool]], where: str) -> list[str]:
    """Schema, emptiness and id-uniqueness problems of one split (each naming file, row and field).

    Args:
        name: Split name.
        features: Column name -> HF feature (only its type name is used).
        rows: The split's rows.
        fields: Expected columns: name -> (type, must be non-empty).
        where: The split's directory, for the messages.
    """
    missing = [f for f in fields if f not in features]
    if missing:
        return [f"{where}: split {name!r} lacks field(s) {missing} (has {sorted(features)})"]
    bad = [f"{where}: split {name!r} field {f!r} has type {_feature_type(features[f])}, expected {t}"
           for f, (t, _) in fields.items() if _feature_type(features[f]) != t]
    if bad:
        return bad[:3]
    errors: list[str] = []
    seen: dict[str, int] = {}
    for i, row in enumerate(rows):
        rid = row.get("id")
        for f, (t, required) in fields.items():
            v = row[f]
            empty = (not v or not str(v).strip()) if t == "string" else (not v or any(not str(x).strip() for x in v))
            if required and empty:
                errors.append(f"{where}: split {name!r} row {i} (id {rid!r}) field {f!r} is empty")
        if "label" in fields and row.get("label") not in PROMPT_LABELS:
            errors.append(f"{where}: split {name!r} row {i} (id {rid!r}) field 'label' is {row.get('label')!r}, "
                          f"expected one of {list(PROMPT_LABELS)}")
        if rid in seen:
            errors.append(f"{where}: split {name!r} row {i} field 'id': duplicate id {rid!r} (also row {seen[rid]})")
        seen.setdefault(rid, i)
        if len(errors) >= 3:
            break
    return errors


def validate_world(world: Any, path: str) -> None:
    """Check every split of a loaded embedded world against :data:`FACT_FIELDS` / :data:`PROMPT_FIELDS`.

    Raises:
        ValueError: Listing the first problems, each naming ``path/split``, row, id and field.
    """
    errors: list[str] = []
    for name in world:
        if name == "refusal_templates":
            continue
        fields = PROMPT_FIELDS if name.startswith("rl_prompts") else FACT_FIELDS
        errors += split_errors(name, world[name].features, world[name], fields, os.path.join(path, name))
    if errors:
        raise ValueError(f"invalid world files in {path}: " + "; ".join(errors[:5]))


def prompt_length_errors(prompts: Iterable[tuple[str, str]], count_tokens: Any, max_positions: int,
                         max_new_tokens: int, flag: str, source: str) -> list[str]:
    """Prompts whose tokens plus ``max_new_tokens`` exceed the model's context.

    Args:
        prompts: ``(id, formatted prompt)`` pairs.
        count_tokens: Prompt text -> number of prompt tokens (as fed to ``generate``).
        max_positions: The model's ``max_position_embeddings``.
        max_new_tokens: Tokens generated after the prompt.
        flag: The flag that sets ``max_new_tokens`` (named in the message).
        source: Where the prompts come from (named in the message).
    """
    out = []
    for pid, text in prompts:
        n = count_tokens(text)
        if n + max_new_tokens > max_positions:
            out.append(f"prompt {pid!r} in {source} has {n} tokens; with {flag}={max_new_tokens} that is "
                       f"{n + max_new_tokens} > the model's max_position_embeddings={max_positions}")
    return out


def check_grpo_inputs(model: Any, datamodule: Any) -> None:
    """Before fit/validate/test of a GRPO module on a ``ForgetRetainDataModule``: load and check the world,
    and check every RL and evaluation prompt fits the model's context with the configured generation length.

    Does nothing for other module / datamodule types. Loads only the tokenizer and the model's config.
    """
    hp = getattr(model, "hparams", {})
    if not hasattr(model, "policy_cfg") or "max_new_tokens" not in hp or not hasattr(datamodule, "eval_items"):
        return
    datamodule.setup("fit")  # loads and validates the world (idempotent)
    from transformers import AutoConfig

    from rerule_lightning.primitives.policy import check_local_path, load_tokenizer

    cfg = model.policy_cfg
    if not isinstance(cfg.name_or_path, str) or not cfg.name_or_path.strip():
        raise ValueError(f"--model.init_args.policy.name_or_path is {cfg.name_or_path!r}: set the model to train "
                         "(a local directory or a hub id)")
    check_local_path(cfg.name_or_path, "--model.init_args.policy.name_or_path")
    try:
        tok = load_tokenizer(cfg)
    except (OSError, ValueError):  # loading the policy will say what is wrong; the rewards are probed anyway
        tok = None
    check_rewards(model, datamodule, tok)
    try:
        config = AutoConfig.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError):  # e.g. an adapter-only directory: loading the policy will say what is wrong
        return
    limit = getattr(config, "max_position_embeddings", None)
    if not limit:
        return
    tok = tok if tok is not None else load_tokenizer(cfg)
    bos = 1 if tok.bos_token_id is not None else 0
    count = lambda text: bos + len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    world = getattr(datamodule.hparams, "world_dir", "the world")
    errors = prompt_length_errors(((r["id"], r["prompt"]) for r in datamodule.pool), count, limit,
                                  int(hp["max_new_tokens"]), "--model.init_args.max_new_tokens",
                                  f"{world} (RL prompts)")
    if not errors and "eval_max_new_tokens" in hp:
        suite = getattr(datamodule, "eval_suite", None)
        specs = {s.name: s for s in suite.splits} if suite is not None else {}
        for split, items in datamodule.eval_items.items():
            spec = specs.get(split)
            n_new, flag = int(hp["eval_max_new_tokens"]), "--model.init_args.eval_max_new_tokens"
            if spec is not None and not spec.generate:
                n_new, flag = 0, f"(no generation on split {split!r})"
            elif spec is not None and spec.max_new_tokens is not None:  # the benchmark's own length, e.g. VerbMem
                n_new, flag = spec.max_new_tokens, f"the {suite.name} suite's max_new_tokens of split {split!r}"
            errors += prompt_length_errors(((r["id"], r["prompt"]) for r in items), count, limit, n_new, flag,
                                           f"{world} (split {split!r})")
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ValueError(errors[0] + more + f"; lower the flag or use a model with a longer context than "
                         f"{cfg.name_or_path}")


def check_rewards(model: Any, datamodule: Any, tokenizer: Any) -> None:
    """Every reward of a GRPO module takes TRL's call and returns one float / ``None`` per completion, tried on
    one forget and one boundary row of the RL pool (:meth:`~rerule_lightning.rl.reward_contract.RewardContract.
    preflight`), before the model is loaded.

    Raises:
        ValueError: One line naming the reward (``--model.init_args.reward``) and what is wrong.
    """
    from rerule_lightning.rl.reward_contract import RewardContract, probe_call

    contract = getattr(model, "reward_fn", None)
    pool = list(getattr(datamodule, "pool", None) or [])
    columns = getattr(datamodule, "prompt_columns", None)  # the columns of its training batches
    if not isinstance(contract, RewardContract) or not pool or not columns:
        return
    rows = [next(r for r in pool if r.get("label") == lab) for lab in ("forget", "boundary")
            if any(r.get("label") == lab for r in pool)]
    encode = (lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]) if tokenizer is not None \
        else (lambda text: [])
    try:
        contract.preflight(probe_call(rows, columns, encode))
    except ValueError as e:
        raise ValueError(f"--model.init_args.reward: {e}") from None


LIGHTNING_CKPT_ALIASES = ("last", "best", "hpc", "registry")


def preflight_checkpoint(config: Any) -> tuple[str, dict[str, Any]] | None:
    """A ``--ckpt_path`` file must load with ``weights_only=True`` and be a Lightning checkpoint.

    ``last`` / ``best`` are resolved by Lightning later and loaded through the same checks
    (:class:`~rerule_lightning.primitives.checkpointing.AtomicCheckpointIO`).

    Returns:
        ``(path, parameter name -> shape)`` of the file (shapes as ``meta`` tensors, no weights kept), for
        :func:`check_checkpoint_model`; ``None`` without a file.

    Raises:
        FileNotFoundError, ValueError: Naming the file (see :func:`rerule_lightning.primitives.checkpointing.safe_load`).
    """
    import torch

    from rerule_lightning.primitives.checkpointing import validate_checkpoint

    sub = config.get("subcommand") if config is not None else None
    ckpt = config[sub].get("ckpt_path") if sub else None
    if not ckpt or str(ckpt) in LIGHTNING_CKPT_ALIASES:
        return None
    try:
        loaded = validate_checkpoint(str(ckpt))
    except FileNotFoundError:
        raise FileNotFoundError(f"--ckpt_path {ckpt}: file not found") from None
    state = loaded.get("state_dict") or {}
    shapes = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") if torch.is_tensor(v) else v
              for k, v in state.items()}
    return str(ckpt), shapes


def check_checkpoint_model(cli: Any, checkpoint: tuple[str, Mapping[str, Any]] | None) -> None:
    """Refuse a ``--ckpt_path`` file of another model before Lightning starts (and creates an MLflow run).

    Builds the configured model as Lightning would (``configure_model`` under the strategy's and precision's
    init contexts; the hook is idempotent, so Lightning's own call then finds it built) and compares parameter
    names and shapes with the file (:func:`~rerule_lightning.primitives.checkpointing.check_state_dict_matches`). Skipped,
    the same check then running when Lightning restores the file, for a module with ``strict_loading = False``
    and for strategies that build the model inside their launched, sharded processes (FSDP, DeepSpeed).

    Raises:
        ValueError: Naming the file and the first differing parameter names / shapes.
    """
    if checkpoint is None:
        return
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    from rerule_lightning.primitives.checkpointing import check_state_dict_matches

    model, trainer = cli.model, cli.trainer
    strategy = trainer.strategy
    if not getattr(model, "strict_loading", True) or strategy.restore_checkpoint_after_setup \
            or not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        return
    with strategy.tensor_init_context(), strategy.model_sharded_context(), \
            trainer.precision_plugin.module_init_context():
        model.configure_model()
    path, shapes = checkpoint
    check_state_dict_matches(shapes, model.state_dict(), path)


def check_master_weights(model: Any, trainer: Any) -> None:
    """``rerule fit`` of a module that trains ``policy``: every trainable parameter float32
    (:func:`rerule_lightning.primitives.policy.master_weight_error`), checked on the config alone.

    Raises:
        ValueError: One line naming the setting to change.
    """
    import lightning as L

    from rerule_lightning.primitives.policy import PolicyConfig, master_weight_error

    cfg = getattr(model, "policy_cfg", None)
    trains = getattr(type(model), "training_step", None) is not L.LightningModule.training_step
    if not isinstance(cfg, PolicyConfig) or not trains:  # e.g. the evaluation module (bf16 weights are fine)
        return
    problem = master_weight_error(cfg, getattr(trainer, "precision", None))
    if problem:
        raise ValueError(problem)


def preflight(cli: Any, subcommand: str) -> None:
    """What the ``rerule fit | validate | test`` CLI checks and sets up before Lightning runs anything.

    Every path (model directories, tokenizer, outputs, the tracking store) was checked before the classes were
    built (:func:`rerule_lightning.cli.paths.check_paths`). Then, in order (the first failure stops; nothing has been
    trained, written or logged yet, no MLflow run exists):

    0. ``fit``: every trainable parameter is float32 (:func:`check_master_weights`);
    1. every HTTP(S) MLflow tracking server answers (:func:`rerule_lightning.tracking.logger.check_reachable`);
    2. the world files and prompt lengths (:func:`check_grpo_inputs`);
    3. a ``--ckpt_path`` file (already checked to be a safe Lightning checkpoint while parsing, by
       :func:`preflight_checkpoint`) holds the configured model's parameters (:func:`check_checkpoint_model`).

    Then checkpoints are routed through :class:`~rerule_lightning.primitives.checkpointing.AtomicCheckpointIO` and the
    resilient MLflow logger is told where the checkpoints go (its local CSV lives beside them).
    """
    from lightning.pytorch.loggers import MLFlowLogger
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from rerule_lightning.primitives.checkpointing import AtomicCheckpointIO
    from rerule_lightning.tracking.logger import ResilientMLFlowLogger, check_reachable

    trainer = cli.trainer
    if subcommand == "fit":
        check_master_weights(cli.model, trainer)
    for logger in trainer.loggers:
        if isinstance(logger, MLFlowLogger):
            check_reachable(logger._tracking_uri)
    check_grpo_inputs(cli.model, cli.datamodule)
    check_checkpoint_model(cli, getattr(cli, "checkpoint", None))
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    for logger in trainer.loggers:
        if isinstance(logger, ResilientMLFlowLogger):
            logger.bind(trainer)


def check_config_files(argv: list[str]) -> None:
    """Every ``--config`` file exists, is UTF-8 text and has no key twice in one mapping (jsonargparse would
    report none of these with the file name; YAML would keep the last of two keys silently).

    Raises:
        FileNotFoundError, ValueError: Naming the file (and the line / byte offset).
    """
    paths = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--config", "-c")]
    paths += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--config {path}: file not found")
        raw = open(path, "rb").read()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise ValueError(f"--config {path}: not valid UTF-8 (line {line}, byte {e.start}: "
                             f"{raw[e.start:e.start + 1]!r})") from None
        dup = duplicate_key(raw.decode("utf-8"))
        if dup:
            raise ValueError(f"--config {path}: {dup}")


def duplicate_key(text: str) -> str | None:
    """The first key given twice in one YAML mapping (YAML keeps the last silently: two ``trainer:`` blocks
    drop the first), as ``line N: duplicate key 'a.b' (first at line M)``; ``None`` if none (or if the text is
    not YAML: jsonargparse reports that)."""
    import yaml

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None

    def walk(node: Any, where: list[str]) -> str | None:
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value != "<<":
                    line = key.start_mark.line + 1
                    if key.value in seen:
                        name = ".".join([*where, key.value])
                        return f"line {line}: duplicate key {name!r} (first at line {seen[key.value]}); merge the two"
                    seen[key.value] = line
                found = walk(value, [*where, key.value] if isinstance(key, yaml.ScalarNode) else where)
                if found:
                    return found
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                found = walk(item, [*where, str(i)])
                if found:
                    return found
        return None

    return walk(root, [])
