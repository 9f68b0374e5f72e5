"""Stop tokens come from the model too: a rollout (and a greedy answer) ends at the tokenizer's EOS, at any id of
the model's saved ``generation_config.eos_token_id`` (an int or a list, as Llama-3.1-Instruct lists
``<|eot_id|>`` / ``<|eom_id|>``) and at ``stop_token_ids``. Tested with a saved config that lists two ids besides
the EOS, through ``rerule fit``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch

from rerule_lightning.cli.commands import main
from rerule_lightning.primitives.generation import greedy_generate, model_eos_ids, stop_ids
from tests.test_cli_configs import QUIET, RULE, _rule_overrides

pytestmark = pytest.mark.usefixtures("one_torch_thread")
GROUPS: list = []


class Record(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: D102
        GROUPS.extend(outputs["groups"])


def _model_with_stops(tiny_prepared: dict, tmp_path: Path) -> tuple[str, list[int], int]:
    """The tiny target with ``generation_config.eos_token_id = [eos, a, b]`` (a, b: ids of frequent words)."""
    from transformers import AutoTokenizer

    out = tmp_path / "model"
    shutil.copytree(os.path.realpath(tiny_prepared["links"]["target"]), out)
    tok = AutoTokenizer.from_pretrained(str(out))
    a, b = (tok(w, add_special_tokens=False)["input_ids"][0] for w in (" was", " in"))
    assert len({a, b, tok.eos_token_id}) == 3
    gc_path = out / "generation_config.json"
    gc = json.loads(gc_path.read_text())
    gc["eos_token_id"] = [tok.eos_token_id, a, b]
    gc_path.write_text(json.dumps(gc))
    return str(out), [a, b], tok.eos_token_id


def test_stop_ids_union_int_and_list(tiny_prepared: dict, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, (a, b), eos = _model_with_stops(tiny_prepared, tmp_path)
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    assert model_eos_ids(model) == [eos, a, b]
    assert stop_ids(tok, model, [99, a]) == [eos, a, b, 99]  # union, tokenizer's EOS first, no repeats
    model.generation_config.eos_token_id = a  # an int
    assert stop_ids(tok, model) == [eos, a] and stop_ids(tok) == [eos]
    # greedy answers stop there too: each is its plain answer cut right after the first " was" / " in" (the stop
    # token is generated, then generation ends; these two are ordinary words, so they decode)
    from datamodules.embedded import load_world
    from rerule_lightning.primitives.prompting import format_prompt

    world = load_world(tiny_prepared["links"]["world"])
    prompts = [format_prompt(r["questions"][0]) for r in world["retain"].select(range(4))]
    model.generation_config.eos_token_id = eos
    plain = greedy_generate(model, tok, prompts, max_new_tokens=16)
    model.generation_config.eos_token_id = [eos, a, b]
    stopped = greedy_generate(model, tok, prompts, max_new_tokens=16)
    assert any(" was " in p or " in " in p for p in plain)
    for p, q in zip(plain, stopped):
        if " was " in f" {p} " or " in " in f" {p} ":  # cut right after the first stop word
            cut = min(i for i in (f" {p} ".find(" was "), f" {p} ".find(" in ")) if i >= 0)
            word = " was" if f" {p} "[cut:].startswith(" was ") else " in"
            assert q == p[: cut - 1 + len(word)] if cut else q == word.strip()
        else:  # no stop word: the same answer
            assert q == p


def test_rollouts_end_at_the_model_generation_config_stops(tiny_prepared: dict, tmp_path: Path) -> None:
    GROUPS.clear()
    path, (a, b), eos = _model_with_stops(tiny_prepared, tmp_path)
    overlay = tmp_path / "rec.yaml"
    overlay.write_text("trainer:\n  callbacks:\n    - class_path: test_stop_tokens.Record\n")
    args = _rule_overrides(tiny_prepared, tmp_path)
    args[args.index("--model.init_args.policy.name_or_path") + 1] = path
    assert main(["fit", "--config", str(RULE), "--config", str(overlay), *args,
                 "--model.init_args.max_new_tokens", "12", "--model.init_args.export_dir", "null",
                 "--trainer.max_steps", "1", *QUIET]) == 0
    stops = {eos, a, b}
    ended = {"a_or_b": 0}
    for grp in GROUPS:
        for ids, m in zip(grp.completion_ids, grp.completion_mask):
            n = int(m.sum())
            body = ids[: n - 1].tolist()
            assert not stops & set(body), "a completion ran past a stop id"
            if n < m.numel() or n == 12:
                last = int(ids[n - 1])
                ended["a_or_b"] += last in (a, b)
    assert ended["a_or_b"] > 0, "no rollout ended at a generation_config stop id: the test would prove nothing"
    assert torch.is_tensor(GROUPS[0].completion_ids)
