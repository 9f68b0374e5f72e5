"""``rerule attack``: is it forgotten or only refused? Sampling, quantization, relearning and adversarial-prompt
attacks on one model, written to ``attack.json`` / ``attack.md`` and logged to MLflow.

    rerule attack --config configs/embedded/attack.yaml --model .cache/rerule/runs/rule

Every attack is scored with the project's evaluator (refusal detector, fact matcher, ROUGE of ``rerule test``)
on the items of the configured datamodule (``data``: the embedded world, TOFU, MUSE, RWKU), beside the same
metrics of the unattacked model (greedy, plain prompts), so each row has its Δ. The attack code is in
:mod:`rerule_lightning.evaluation.attacks`; the adversarial prompts come from the data
(:mod:`datamodules.attack_prompts`). Everything in the config is checked before a model is loaded.
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import asdict
from typing import Any, Literal

import lightning as L

from rerule_lightning.cli.attack_config import (
    ATTACKS,
    AdversarialAttack,
    QuantizationAttack,
    RelearningAttack,
    SamplingAttack,
)
from rerule_lightning.cli.lightning_cli import DEFAULT_TRACKING_URI


def _say(msg: str) -> None:
    print(f"attack: {msg}", file=sys.stderr, flush=True)


def metric_key(*parts: str) -> str:
    """An MLflow key in ``[a-z0-9_/.]`` from path parts (other characters become ``_``)."""
    return re.sub(r"[^a-z0-9_/.]", "_", "/".join(parts).lower())


def _check_splits(flag: str, splits: list[str], known: list[str]) -> None:
    bad = [s for s in splits if s not in known]
    if bad:
        raise ValueError(f"{flag}: split(s) {bad} are not evaluated by data (its eval_splits: {known})")


def attack(model: str, data: L.LightningDataModule, attacks: list[str] | None = None,
           sampling: SamplingAttack = SamplingAttack(),  # noqa: B008 - dataclass defaults (jsonargparse groups)
           quantization: QuantizationAttack = QuantizationAttack(),  # noqa: B008
           relearning: RelearningAttack = RelearningAttack(),  # noqa: B008
           adversarial: AdversarialAttack = AdversarialAttack(),  # noqa: B008
           target_model: str | None = None, retain_model: str | None = None, tokenizer: str | None = None,
           dtype: Literal["float32", "bfloat16", "float16"] = "float32", max_new_tokens: int = 32,
           batch_size: int = 64, seed: int = 0, output_dir: str = "runs/attack",
           tracking_uri: str | None = DEFAULT_TRACKING_URI, experiment: str = "rerule-attack",
           run_name: str | None = None) -> dict[str, Any]:
    """Is it forgotten or only refused? Attack one model: sampling at temperature 1 (leak@k), 8- / 4-bit weight
    quantization, relearning on half of the forget targets (LoRA and full; the other half is scored), adversarial
    prompts; each beside the unattacked model. Writes ``<output_dir>/attack.json`` (every metric, the table, the
    relearning halves), ``attack.md`` (the table) and ``relearn_halves.json``, and logs them to MLflow.

    Args:
        model: Directory of the model under test (an ``AutoModelForCausalLM`` with its tokenizer).
        data: The datamodule whose evaluation items are attacked (as in the benchmark's ``eval.yaml``).
        attacks: Which attacks run, in order: ``sampling``, ``quantization``, ``relearning``, ``adversarial``
            (default: all four).
        sampling: Sampling attack settings (leak@k).
        quantization: Quantization attack settings.
        relearning: Relearning attack settings.
        adversarial: Adversarial prompt settings.
        target_model: The model before unlearning (relearning's ``target`` control).
        retain_model: The model that never saw the forget set (relearning's ``retain`` control).
        tokenizer: Tokenizer id or directory of every attacked model (default: each model's own directory).
        dtype: Parameter dtype the models are loaded in.
        max_new_tokens: Greedy / sampled tokens per answer (a split's own budget overrides it).
        batch_size: Items per generation batch.
        seed: Seed of sampling, relearning batches and LoRA initialisation.
        output_dir: Where attack.json, attack.md and relearn_halves.json are written.
        tracking_uri: MLflow tracking URI (``null``: no MLflow run).
        experiment: MLflow experiment of the attack run.
        run_name: MLflow run name (default: the model directory's name).

    Returns:
        The ``attack.json`` content.
    """
    from rerule_lightning.cli.paths import check_model_dir, check_output, check_tracking_uri

    attacks = list(ATTACKS) if attacks is None else list(attacks)
    bad = [a for a in attacks if a not in ATTACKS]
    if not attacks or bad:
        raise ValueError(f"--attacks={attacks}: each must be one of {list(ATTACKS)}")
    for name, v in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if v < 1:
            raise ValueError(f"--{name}={v}: must be >= 1")
    check_model_dir(model, "--model")
    if "relearning" in attacks:
        for which, path, flag in (("target", target_model, "--target_model"), ("retain", retain_model, "--retain_model")):
            if which in relearning.models:
                if not path:
                    raise ValueError(f"relearning.models includes {which!r}: set {flag}")
                check_model_dir(path, flag)
    check_output(output_dir, "dir", "--output_dir")
    check_tracking_uri(tracking_uri, "--tracking_uri")
    if tracking_uri and tracking_uri.startswith(("http://", "https://")):
        from rerule_lightning.tracking.logger import server_problem

        problem = server_problem(tracking_uri, timeout_s=5.0)
        if problem is not None:
            raise ValueError(f"--tracking_uri={tracking_uri}: MLflow tracking server is not reachable ({problem})")
    if "quantization" in attacks:
        from rerule_lightning.evaluation.attacks.quantize import resolve_backend

        resolve_backend(quantization.backend)
    check_model_dir(tokenizer, "--tokenizer", weights=False)
    known = list(getattr(data, "eval_splits", []))
    if "sampling" in attacks:
        _check_splits("sampling.splits", sampling.splits, known)
    if "quantization" in attacks:
        _check_splits("quantization.splits", quantization.splits, known)
    if "relearning" in attacks:
        _check_splits("relearning.split", [relearning.split], known)

    from rerule_lightning.cli.attack_run import run_attacks

    t0 = time.perf_counter()
    data.setup("test")
    result = run_attacks(model, data, attacks, sampling=sampling, quantization=quantization, relearning=relearning,
                         adversarial=adversarial, target_model=target_model, retain_model=retain_model,
                         tokenizer=tokenizer, dtype=dtype,
                         max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, output_dir=output_dir,
                         say=_say)
    result["config"] = {"model": model, "data": type(data).__name__, "attacks": attacks,
                        "sampling": asdict(sampling), "quantization": asdict(quantization),
                        "relearning": asdict(relearning), "adversarial": asdict(adversarial),
                        "target_model": target_model, "retain_model": retain_model, "tokenizer": tokenizer,
                        "dtype": dtype,
                        "max_new_tokens": max_new_tokens, "batch_size": batch_size, "seed": seed}
    result["seconds"]["total"] = round(time.perf_counter() - t0, 2)
    from rerule_lightning.cli.attack_run import write_outputs

    files = write_outputs(result, output_dir)
    if tracking_uri:
        result["mlflow_run_id"] = log_to_mlflow(result, files, tracking_uri, experiment,
                                                run_name or os.path.basename(os.path.normpath(model)), output_dir)
        write_outputs(result, output_dir)
    _say(f"done in {result['seconds']['total']:.1f} s -> {os.path.abspath(files[0])}")
    return result


def log_to_mlflow(result: dict[str, Any], files: list[str], tracking_uri: str, experiment: str, run_name: str,
                  output_dir: str) -> str | None:
    """One MLflow run: params (the config, flattened), every table value as ``attack/<attack>/<setting>/<split>/
    <metric>`` (unattacked: ``attack/none/greedy/...``), Δs as ``.../<metric>_delta``, the files as artifacts."""
    from rerule_lightning.tracking.logger import ResilientMLFlowLogger, flatten

    logger = ResilientMLFlowLogger(experiment_name=experiment, tracking_uri=tracking_uri, run_name=run_name,
                                   local_dir=output_dir, tags={"rerule.stage": "attack", "rerule.model": result["model"]})
    logger.log_hyperparams(flatten(result["config"]))
    metrics: dict[str, float] = {}
    for r in result["table"]:
        key = metric_key("attack", r["attack"], r["setting"], r["split"], r["metric"])
        metrics[key] = r["value"]
        if r["delta"] is not None:
            metrics[key + "_delta"] = r["delta"]
    logger.log_metrics(metrics, step=0)
    if logger.offline_reason is None:
        for path in files:
            logger.experiment.log_artifact(logger.run_id, path)
    logger.finalize("success")
    return logger.run_id


def attack_main(argv: list[str]) -> int:
    """``rerule attack``: jsonargparse over :func:`attack` (``--config``, ``--help``, ``--threads``)."""
    from rerule_lightning.cli.lightning_cli import function_main

    function_main(attack, argv, prog="rerule attack")
    return 0
