"""``rerule prepare``: build the embedded world, its tokenizer, the target and the retain model.

Every artefact lives in ``cache_dir`` under a name keyed by a hash of what determines it
(``world-<hash>``, ``tokenizer-<hash>``, ``target-<hash>``, ``retain-<hash>``), is written to a temporary
directory first and renamed into place (so an interrupted prepare never leaves a half artefact), and
is skipped when it already exists. ``cache_dir/embedded/{world,tokenizer,target,retain}`` are stable
symbolic links to the current artefacts, which the stage configs point at.

Reference builds (:mod:`rerule_lightning.cli.reference_build`): when a shipped build has the cache key of the
tokenizer, target or retain model a config asks for (``configs/embedded/prepare.yaml``'s are shipped), prepare
verifies its sha256 checksums and copies it to ``<stage>-<key>-ref<digest>`` instead of training, so every
machine evaluates the same models; ``--rebuild`` trains locally (``<stage>-<key>``, as without a build).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from typing import Any

from datamodules.world import WorldConfig
from rerule_lightning.cli.reference_build import (
    SHIPPED,
    STAGES,
    ReferenceBuildError,
    check_world,
    find_reference,
    install_stage,
    texts_sha256,
    verify_stage,
    write_reference,
)
from rerule_lightning.modules.sft import TinyLlamaConfig
from rerule_lightning.primitives.ranges import Count, NonNegative, Positive, Steps, range_errors


@dataclass
class SFTTrainConfig:
    """How the embedded target and retain models are trained.

    Attributes:
        epochs: Passes over every question paraphrase of every trained fact.
        learning_rate: Peak AdamW learning rate (cosine decay, linear warm-up).
        warmup_steps: Linear warm-up steps.
        batch_size: Question-answer pairs per step.
        weight_decay: AdamW weight decay.
        seed: Initialisation and shuffling seed.
    """

    epochs: Count = 20
    learning_rate: Positive = 3e-3
    warmup_steps: Steps = 50
    batch_size: Count = 64
    weight_decay: NonNegative = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if errors := range_errors(SFTTrainConfig, vars(self), "target_training."):
            raise ValueError("; ".join(errors))


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _atomic_build(final: str, build: Any) -> bool:
    """Run ``build(tmp_dir)`` and rename ``tmp_dir`` to ``final``; skip if ``final`` exists."""
    if os.path.isdir(final):
        return False
    tmp = final + f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not os.path.isdir(final):  # a concurrent prepare may have finished the same artefact first
                raise
            return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def _link(target: str, link: str) -> None:
    os.makedirs(os.path.dirname(link), exist_ok=True)
    tmp = link + ".tmp-link"
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(os.path.relpath(target, os.path.dirname(link)), tmp)
    os.replace(tmp, link)


def train_sft_model(world_dir: str, tokenizer_dir: str, out_dir: str, mode: str, model_cfg: TinyLlamaConfig,
                    train: SFTTrainConfig, progress: bool = True) -> None:
    """Train a tiny Llama from scratch on one SFT stage of the world and ``save_pretrained`` it."""
    import lightning as L

    from datamodules.sft import EmbeddedSFTDataModule
    from rerule_lightning.modules.sft import SFTModule
    from rerule_lightning.primitives.policy import PolicyConfig

    L.seed_everything(train.seed, verbose=False)
    dm = EmbeddedSFTDataModule(world_dir=world_dir, tokenizer=tokenizer_dir, mode=mode,
                               batch_size=train.batch_size, seed=train.seed)
    module = SFTModule(policy=PolicyConfig(name_or_path=tokenizer_dir), init=model_cfg,
                       learning_rate=train.learning_rate, warmup_steps=train.warmup_steps,
                       weight_decay=train.weight_decay, export_dir=out_dir)
    callbacks = []
    if progress:
        from lightning.pytorch.callbacks import RichProgressBar

        callbacks.append(RichProgressBar(leave=True))
    trainer = L.Trainer(max_epochs=train.epochs, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=progress, callbacks=callbacks,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)


def check_context(world_dir: str, tokenizer_dir: str, model_cfg: TinyLlamaConfig) -> None:
    """Before training: the model's context holds the world's longest SFT example (target and rejection
    steering), so a too-small ``--model.max_position_embeddings`` fails in seconds, not after training.

    Raises:
        ValueError: Naming the flag, the longest example's length and the smallest value that fits.
    """
    from transformers import AutoTokenizer

    from datamodules.embedded import load_world, sft_pairs
    from rerule_lightning.primitives.prompting import tokenize_pair

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    world = load_world(world_dir)
    longest, where = 0, ""
    for mode in ("target", "rejection_steering"):
        for pair in sft_pairs(world, mode, seed=0):
            n = len(tokenize_pair(tok, pair["prompt"], pair["completion"], 1 << 30)["input_ids"])
            if n > longest:
                longest, where = n, pair["prompt"]
    if longest > model_cfg.max_position_embeddings:
        raise ValueError(f"--model.max_position_embeddings={model_cfg.max_position_embeddings}: the world's longest "
                         f"training example has {longest} tokens ({where[:60]!r}...); use at least {longest}")


def accuracy_report(model_dir: str, world_dir: str, splits: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Greedy exact match (canonical answer) and answer accuracy (fact present) per split, all paraphrases."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from datamodules.embedded import load_world
    from rerule_lightning.primitives.generation import greedy_generate
    from rerule_lightning.primitives.prompting import format_prompt

    world = load_world(world_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    out: dict[str, dict[str, float]] = {}
    for s in splits:
        rows = [(q, r["answer"], r["value"]) for r in world[s] for q in r["questions"]]
        preds = greedy_generate(model, tok, [format_prompt(q) for q, _, _ in rows], max_new_tokens=32)
        exact = sum(p == a for p, (_, a, _) in zip(preds, rows)) / len(rows)
        fact = sum(v.lower() in p.lower() for p, (_, _, v) in zip(preds, rows)) / len(rows)
        out[s] = {"exact_match": exact, "answer_accuracy": fact, "n": len(rows)}
    return out


def cache_keys(world: WorldConfig, model: TinyLlamaConfig, target_training: SFTTrainConfig,
               vocab_size: int) -> dict[str, str]:
    """The cache key of each artefact: a hash of what determines it (the preset only keys the world)."""
    content = world.content_hash(include_preset=False)
    return {
        "world": world.content_hash(include_preset=True),
        "tokenizer": _hash(content, vocab_size),
        "target": _hash(content, vocab_size, asdict(model), asdict(target_training), "target"),
        "retain": _hash(content, vocab_size, asdict(model), asdict(target_training), "retain"),
    }


def prepare(world: WorldConfig = WorldConfig(), model: TinyLlamaConfig = TinyLlamaConfig(),
            target_training: SFTTrainConfig = SFTTrainConfig(), vocab_size: int = 1024,
            cache_dir: str = ".cache/rerule", report: bool = True, progress: bool = True, rebuild: bool = False,
            reference_dir: str | None = None, export_reference: str | None = None) -> dict[str, Any]:
    """Build the embedded world, tokenizer, target and retain models (a shipped reference build if one matches).

    What is cached is skipped; where a shipped, checksummed reference build matches the config its models are
    verified and installed instead of trained (``--rebuild``: train locally).

    The dataclass parameters are typed without ``| None`` on purpose: jsonargparse then expands their
    fields (``--world.num_forget_families`` ...) with their docstrings in ``rerule prepare --help``.
    ``None`` is still accepted from Python and means the defaults.

    Args:
        world: World parameters (families, splits, presets).
        model: Shape of the tiny Llama used for both target and retain models.
        target_training: How target and retain models are trained.
        vocab_size: BPE vocabulary size of the world tokenizer.
        cache_dir: Root of the cache; artefacts are keyed by the hash of their configuration.
        report: Measure greedy accuracy of both models per split and print it (written to
            ``<model>/accuracy.json``).
        progress: Show progress bars.
        rebuild: Train the tokenizer, target and retain models locally even where a reference build matches
            (float32 training differs across CPUs: the local models differ from the shipped ones). ``--rebuild``
            alone means true.
        reference_dir: Where reference builds are looked up (a build or a folder of builds); default the
            shipped ones (``rerule_lightning/cli/reference_builds``).
        export_reference: If set, write the prepared tokenizer, target and retain models there as a reference
            build (files and ``manifest.json`` with their sha256).

    Returns:
        The manifest: paths, hashes, where each artefact came from, per-step wall-clock and the accuracy report.

    Raises:
        ReferenceBuildError: A matching reference build has a missing or changed file, or was trained on another
            world (the message names the file); before any training.
    """
    from rich.console import Console

    from datamodules.embedded import load_world, save_world, train_tokenizer, world_texts
    from datamodules.world import generate_world

    world = world or WorldConfig()
    model = model or TinyLlamaConfig()
    target_training = target_training or SFTTrainConfig()
    console = Console(stderr=True)
    keys = cache_keys(world, model, target_training, vocab_size)
    paths = {k: os.path.join(cache_dir, f"{k}-{h}") for k, h in keys.items()}
    refs = {} if rebuild else find_references(reference_dir, keys)
    world_sha = texts_sha256(world_texts(generate_world(world))) if (refs or export_reference) else ""
    for stage, (build_dir, m) in refs.items():
        check_world(build_dir, m, world_sha)
        paths[stage] = os.path.join(cache_dir, f"{stage}-{keys[stage]}-ref{stage_digest(m, stage)}")
    source = {k: f"reference {refs[k][0]}" if k in refs else "local" for k in paths}
    os.makedirs(cache_dir, exist_ok=True)
    timings: dict[str, float] = {}
    built: dict[str, bool] = {}
    t0 = time.perf_counter()

    def step(name: str, fn: Any) -> None:
        t = time.perf_counter()
        if name in refs:
            build_dir, m = refs[name]
            built[name] = _atomic_build(paths[name], lambda d: install_stage(build_dir, m, name, d))
            verify_stage(build_dir, m, name, paths[name])  # also a copy cached earlier
            how = f"reference build, sha256 verified, {'copied' if built[name] else 'cached'}"
        else:
            built[name] = _atomic_build(paths[name], fn)
            how = "built" if built[name] else "cached"
        timings[name] = round(time.perf_counter() - t, 2)
        console.print(f"[bold]{name}[/]: {how} -> {paths[name]} ({timings[name]:.1f} s)")

    for stage, (build_dir, m) in refs.items():  # every shipped file checked before any work
        verify_stage(build_dir, m, stage)
    if refs:
        console.print(f"reference build {sorted({d for d, _ in refs.values()})[0]}: {', '.join(refs)} "
                      f"(pass --rebuild to train locally)")
    step("world", lambda d: save_world(world, d))
    step("tokenizer", lambda d: train_tokenizer(world_texts(generate_world(world)), d, vocab_size))
    if not all(os.path.isdir(paths[s]) for s in ("target", "retain")):
        check_context(paths["world"], paths["tokenizer"], model)
    for stage in ("target", "retain"):
        step(stage, lambda d, s=stage: train_sft_model(paths["world"], paths["tokenizer"], d, s, model,
                                                       target_training, progress))
    if export_reference:
        config = {"world": world.to_dict(), "model": asdict(model), "target_training": asdict(target_training),
                  "vocab_size": vocab_size}
        written = write_reference(export_reference, {s: paths[s] for s in STAGES}, keys, world_sha, config)
        console.print(f"reference build written: {written}")
    links = {k: os.path.join(cache_dir, "embedded", k) for k in paths}
    for k in paths:
        _link(paths[k], links[k])
    accuracy: dict[str, Any] = {}
    if report:
        splits = {"target": ("forget", "boundary_hard", "boundary_easy", "retain", "world_facts"),
                  "retain": ("forget", "boundary_hard", "retain", "world_facts")}
        for stage in ("target", "retain"):
            cached = os.path.join(paths[stage], "accuracy.json")
            if os.path.exists(cached):
                accuracy[stage] = json.load(open(cached))
            else:
                accuracy[stage] = accuracy_report(paths[stage], paths["world"], splits[stage])
                with open(cached, "w") as f:
                    json.dump(accuracy[stage], f, indent=2)
        _print_report(console, accuracy, load_world(paths["world"]))
    timings["total"] = round(time.perf_counter() - t0, 2)
    manifest = {"paths": paths, "links": links, "hashes": keys, "built": built, "source": source, "seconds": timings,
                "accuracy": accuracy, "world": world.to_dict()}
    with open(os.path.join(cache_dir, "embedded", "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    console.print(f"prepare done in {timings['total']:.1f} s; links in {os.path.join(cache_dir, 'embedded')}")
    return manifest


def find_references(reference_dir: str | None, keys: dict[str, str]) -> dict[str, tuple[str, dict[str, Any]]]:
    """The reference build (directory, manifest) matching each stage's cache key, for the stages one matches."""
    root = reference_dir if reference_dir is not None else str(SHIPPED)
    if reference_dir is not None and not os.path.isdir(reference_dir):
        raise ReferenceBuildError(f"--reference_dir={reference_dir}: no such directory")
    found = {s: find_reference(root, s, keys[s]) for s in STAGES}
    return {s: f for s, f in found.items() if f is not None}


def stage_digest(manifest: dict[str, Any], stage: str) -> str:
    """8 hex digits identifying a reference build's files of ``stage`` (its cache copy's name suffix)."""
    files = {k: v for k, v in manifest["files"].items() if k.split("/", 1)[0] == stage}
    return _hash(files)[:8]


def chance_level(world: Any) -> float:
    """Answer accuracy of guessing a fact uniformly from its pool, averaged over the forget facts."""
    from datamodules.world import value_pools

    pools = value_pools()
    rows = list(world["forget"])
    return sum(1 / len(pools[r["kind"]]) for r in rows) / max(1, len(rows))


def _print_report(console: Any, accuracy: dict[str, Any], world: Any) -> None:
    from rich.table import Table

    table = Table(title="Embedded models: greedy accuracy over every question paraphrase")
    for col in ("model", "split", "n", "exact match", "answer accuracy"):
        table.add_column(col)
    for stage, per in accuracy.items():
        for split, m in per.items():
            table.add_row(stage, split, str(m["n"]), f"{m['exact_match']:.3f}", f"{m['answer_accuracy']:.3f}")
    console.print(table)
    console.print(f"chance level of answer accuracy on forget facts (uniform over each pool): "
                  f"{chance_level(world):.3f}")



def prepare_main(argv: list[str]) -> int:
    """``rerule prepare``: jsonargparse over :func:`prepare`, with ``--threads`` and one-line errors."""
    from rerule_lightning.cli.lightning_cli import function_main
    from rerule_lightning.cli.validation import check_config_files

    check_config_files(argv)
    function_main(prepare, bare_flags(argv, ("--rebuild",)), prog="rerule prepare")
    return 0


def bare_flags(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """``--rebuild`` alone (last, or before another ``--flag``) means ``--rebuild=true``; ``--rebuild false`` and
    ``--rebuild=true`` pass through unchanged."""
    out = []
    for i, a in enumerate(argv):
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        out.append(f"{a}=true" if a in flags and (nxt is None or nxt.startswith("-")) else a)
    return out
