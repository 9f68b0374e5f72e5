"""The attacks of ``rerule attack`` run on a set-up datamodule (:func:`run_attacks`), and the output files."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from rerule_lightning.cli.attack_config import (
    AdversarialAttack,
    QuantizationAttack,
    RelearningAttack,
    SamplingAttack,
)


def _chat(data: Any) -> bool:
    return bool(getattr(data, "use_chat_template", False))


def _free(model: Any) -> None:
    import gc

    del model
    gc.collect()


def _load(path: str, dtype: str, tokenizer: str | None = None) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from rerule_lightning.primitives.policy import PolicyConfig, load_tokenizer

    tok = load_tokenizer(PolicyConfig(name_or_path=path, tokenizer=tokenizer))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model.eval(), tok


def unattacked(model: Any, tok: Any, data: Any, splits: list[str], max_new_tokens: int,
               batch_size: int) -> dict[str, float]:
    """Every metric of the data's own suite on ``splits`` (plain prompts, greedy): the reference of every Δ."""
    from rerule_lightning.evaluation.attacks.scoring import evaluate_splits

    suite = data.eval_suite.subset(splits)
    return evaluate_splits(model, tok, data.eval_items, suite, max_new_tokens, batch_size, _chat(data))


def sampling_attack(model: Any, tok: Any, data: Any, cfg: SamplingAttack, seed: int, max_new_tokens: int,
                    batch_size: int, say: Callable[[str], None]) -> dict[str, Any]:
    """leak@k, refusal and answer accuracy of the samples, per split."""
    from rerule_lightning.evaluation.attacks.sampling import sample_flags, sample_items, sampling_metrics

    metrics: dict[str, float] = {}
    k_max = max(cfg.ks)
    device = next(model.parameters()).device
    for split in cfg.splits:
        items = data.eval_items[split]
        t = time.perf_counter()
        texts = sample_items(model, tok, items, k_max, seed, cfg.max_new_tokens or max_new_tokens, cfg.temperature,
                             cfg.top_p, batch_size=max(batch_size, k_max) * 4, device=device)
        correct, refused = sample_flags(texts, [str(r["value"]) for r in items])
        metrics.update({f"{split}/{k}": v for k, v in sampling_metrics(correct, refused, cfg.ks).items()})
        say(f"sampling: {split}: {len(items)} items x {k_max} samples ({time.perf_counter() - t:.1f} s)")
    return {"settings": {f"t{cfg.temperature:g}_p{cfg.top_p:g}": metrics}}


def quantization_attack(model_dir: str, tok: Any, data: Any, cfg: QuantizationAttack, dtype: str,
                        max_new_tokens: int, batch_size: int, say: Callable[[str], None]) -> dict[str, Any]:
    """Every metric of the quantization splits after each bit width."""
    import torch

    from rerule_lightning.evaluation.attacks.quantize import load_quantized

    settings, used = {}, None
    for bits in cfg.bits:
        t = time.perf_counter()
        qmodel, used = load_quantized(model_dir, bits, cfg.backend, getattr(torch, dtype))
        # LLM.int8() logs, on every matmul, that it casts float32 inputs to float16
        bnb_log = logging.getLogger("bitsandbytes.autograd._functions")
        level = bnb_log.level
        bnb_log.setLevel(logging.ERROR)
        try:
            settings[f"{bits}bit"] = unattacked(qmodel, tok, data, cfg.splits, max_new_tokens, batch_size)
        finally:
            bnb_log.setLevel(level)
        _free(qmodel)
        say(f"quantization: {bits}-bit ({used}) ({time.perf_counter() - t:.1f} s)")
    return {"backend": used, "settings": settings}


def relearn_items(data: Any, cfg: RelearningAttack, content_hash: str) -> tuple[dict[str, Any], dict[str, list]]:
    """The halves (``{"first", "second", ...}``, stored as relearn_halves.json) and their items."""
    from rerule_lightning.primitives.halves import RELEARN_SALT, split_halves

    items = data.eval_items[cfg.split]
    group = (lambda r: str(r["id"]).split("#", 1)[0]) if cfg.group_by == "id" else (lambda r: str(r["target"]))
    first, second = split_halves([group(r) for r in items], content_hash)
    halves = {"split": cfg.split, "group_by": cfg.group_by, "content_hash": content_hash, "salt": RELEARN_SALT,
              "first": first, "second": second}
    a, b = set(first), set(second)
    return halves, {"forget_first_half": [r for r in items if group(r) in a],
                    "forget_second_half": [r for r in items if group(r) in b]}


def relearning_attack(paths: dict[str, str], tokenizer: str | None, data: Any, cfg: RelearningAttack,
                      halves_items: dict[str, list], dtype: str, seed: int, max_new_tokens: int, batch_size: int,
                      say: Callable[[str], None]) -> dict[str, Any]:
    """Per fine-tuning mode and attacked model, both halves' metrics at step 0 and after each step count."""
    import torch

    from rerule_lightning.evaluation.attacks.relearn import relearn_curve
    from rerule_lightning.evaluation.attacks.scoring import evaluate_splits, generation_suite
    from rerule_lightning.primitives.policy import PolicyConfig, build_policy, load_tokenizer

    suite = generation_suite({s: cfg.split for s in halves_items}, like=data.eval_suite, name="relearn")
    pairs = [(r["prompt"], r["answer"]) for r in halves_items["forget_first_half"]]
    settings: dict[str, dict[str, float]] = {}
    for peft in cfg.peft:
        for which in cfg.models:
            t = time.perf_counter()
            torch.manual_seed(seed)
            pcfg = PolicyConfig(name_or_path=paths[which], tokenizer=tokenizer, peft=peft, dtype=dtype,
                                lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha)
            tok = load_tokenizer(pcfg)
            m = build_policy(pcfg)
            if torch.cuda.is_available():
                m = m.to("cuda")
            lr = cfg.lora_learning_rate if peft == "lora" else cfg.learning_rate
            curve = relearn_curve(
                m, tok, pairs, lambda mod, tok=tok: evaluate_splits(mod, tok, halves_items, suite, max_new_tokens,
                                                                    batch_size, _chat(data)),
                cfg.steps, lr, cfg.batch_size, seed=seed, use_chat_template=_chat(data),
                max_length=int(getattr(m.config, "max_position_embeddings", 512)), max_grad_norm=cfg.max_grad_norm)
            for k, metrics in curve.items():
                settings[f"{peft}/{which}/steps_{k}"] = metrics
            _free(m)
            say(f"relearning: {peft} on {which} ({time.perf_counter() - t:.1f} s)")
    return {"settings": settings}


def adversarial_attack(model: Any, tok: Any, data: Any, items: dict[str, dict[str, list]], max_new_tokens: int,
                       batch_size: int, say: Callable[[str], None]) -> dict[str, Any]:
    """Per attack kind, the generation metrics of its prompts on each split."""
    from rerule_lightning.evaluation.attacks.scoring import evaluate_splits, generation_suite

    settings = {}
    for kind, by_split in items.items():
        t = time.perf_counter()
        suite = generation_suite(list(by_split), like=data.eval_suite, name="adversarial")
        settings[kind] = evaluate_splits(model, tok, by_split, suite, max_new_tokens, batch_size, _chat(data))
        say(f"adversarial: {kind} ({sum(len(v) for v in by_split.values())} prompts, {time.perf_counter() - t:.1f} s)")
    return {"settings": settings}


def check_lengths(tok: Any, items: dict[str, dict[str, list]], limit: int | None, max_new_tokens: int) -> None:
    """Every adversarial prompt plus ``max_new_tokens`` fits the model's positions (else name the longest)."""
    if not limit:
        return
    for kind, by_split in items.items():
        for rows in by_split.values():
            for r in rows:
                n = len(tok(r["prompt"], add_special_tokens=False)["input_ids"]) + 1
                if n + max_new_tokens > limit:
                    raise ValueError(f"adversarial: prompt {r['id']} ({kind}) is {n} tokens; with --max_new_tokens="
                                     f"{max_new_tokens} it exceeds the model's max_position_embeddings={limit}")


def run_attacks(model_dir: str, data: Any, attacks: list[str], *, sampling: SamplingAttack,
                quantization: QuantizationAttack, relearning: RelearningAttack, adversarial: AdversarialAttack,
                target_model: str | None, retain_model: str | None, tokenizer: str | None, dtype: str, max_new_tokens: int, batch_size: int,
                seed: int, output_dir: str, say: Callable[[str], None]) -> dict[str, Any]:
    """Run ``attacks`` on the model at ``model_dir`` over the set-up ``data``; returns attack.json's content."""
    from datamodules.attack_prompts import attack_items, content_hash
    from rerule_lightning.evaluation.attacks.scoring import attack_rows

    chash = content_hash(data)
    adv_items = attack_items(data, adversarial.splits, adversarial.kinds, seed,
                                                  adversarial.num_demos) if "adversarial" in attacks else {}
    halves, halves_items = relearn_items(data, relearning, chash) if "relearning" in attacks else (None, {})
    if halves is not None:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "relearn_halves.json"), "w", encoding="utf-8") as f:
            json.dump(halves, f, indent=2)
    model, tok = _load(model_dir, dtype, tokenizer)
    check_lengths(tok, adv_items, getattr(model.config, "max_position_embeddings", None), max_new_tokens)
    splits = list(data.eval_splits)  # the reference of every delta: every metric of every evaluated split
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    base = unattacked(model, tok, data, splits, max_new_tokens, batch_size) if splits else {}
    seconds["unattacked"] = round(time.perf_counter() - t, 2)
    say(f"unattacked: {len(splits)} splits ({seconds['unattacked']:.1f} s)")
    parts: dict[str, Any] = {}
    for name in attacks:
        t = time.perf_counter()
        if name == "sampling":
            parts[name] = sampling_attack(model, tok, data, sampling, seed, max_new_tokens, batch_size, say)
        elif name == "quantization":
            parts[name] = quantization_attack(model_dir, tok, data, quantization, dtype, max_new_tokens, batch_size, say)
        elif name == "relearning":
            paths = {"model": model_dir, "target": target_model or "", "retain": retain_model or ""}
            parts[name] = relearning_attack(paths, tokenizer, data, relearning, halves_items, dtype, seed,
                                            max_new_tokens, batch_size, say)
            parts[name]["halves"] = halves
        elif name == "adversarial":
            parts[name] = adversarial_attack(model, tok, data, adv_items, max_new_tokens, batch_size, say)
        seconds[name] = round(time.perf_counter() - t, 2)
    result = {"model": model_dir, "content_hash": chash, "unattacked": {"metrics": base}, "attacks": parts,
              "seconds": seconds}
    result["table"] = attack_rows(result)
    return result


def write_outputs(result: dict[str, Any], output_dir: str) -> list[str]:
    """Write attack.json (atomically) and attack.md; return their paths."""
    from rerule_lightning.evaluation.attacks.scoring import render_markdown
    from rerule_lightning.primitives.jsonio import write_json_atomic

    os.makedirs(output_dir, exist_ok=True)
    js, md = os.path.join(output_dir, "attack.json"), os.path.join(output_dir, "attack.md")
    write_json_atomic(js, result)
    backend = result["attacks"].get("quantization", {}).get("backend")
    with open(md, "w", encoding="utf-8") as f:
        f.write(f"# rerule attack: {result['model']}\n\n")
        if backend:
            f.write(f"Quantization backend: {backend}.\n\n")
        f.write("Δ: value minus the same model unattacked (greedy, plain prompts) on the same split; leak_at_k (at "
                "least one of k samples at temperature 1 states the fact) against greedy answer accuracy; relearning "
                "`<peft>/<model>/steps_<k>` against its `steps_0`. attack.json has every metric.\n\n")
        f.write(render_markdown(result["table"]))
    paths = [js, md]
    halves = os.path.join(output_dir, "relearn_halves.json")
    return paths + ([halves] if os.path.exists(halves) else [])
