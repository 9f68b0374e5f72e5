"""Reference builds (``rerule_lightning.cli.reference_build``): ``rerule prepare`` of a config whose build is
shipped copies it (checksums verified, no training), refuses a corrupted or missing file naming it, and trains
locally with ``--rebuild``; the shipped build is the one of ``configs/embedded/prepare.yaml``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import TINY_MODEL, TINY_TRAIN, TINY_WORLD

from datamodules.embedded import world_texts
from datamodules.world import WorldConfig, generate_world
from rerule_lightning.cli import prepare as prep
from rerule_lightning.cli import reference_build as rb
from rerule_lightning.cli.commands import main
from rerule_lightning.modules.sft import TinyLlamaConfig

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("tokenizer", "target", "retain")
#: One epoch: the tiny models train in seconds (their quality does not matter here).
ONE_EPOCH = {**TINY_TRAIN, "epochs": 1}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "prepare.yaml"
    path.write_text(yaml.safe_dump({"world": TINY_WORLD, "model": TINY_MODEL, "target_training": ONE_EPOCH,
                                    "vocab_size": 512, "report": False, "progress": False}))
    return path


@pytest.fixture
def trained(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The stages ``rerule prepare`` trains (the real training still runs)."""
    calls: list[str] = []
    real = prep.train_sft_model

    def spy(world_dir: str, tokenizer_dir: str, out_dir: str, mode: str, *args: Any, **kwargs: Any) -> None:
        calls.append(mode)
        real(world_dir, tokenizer_dir, out_dir, mode, *args, **kwargs)

    monkeypatch.setattr(prep, "train_sft_model", spy)
    return calls


@pytest.fixture
def reference(tmp_path: Path, trained: list[str]) -> Path:
    """A tiny-world reference build, trained here and written by ``rerule prepare --export_reference``."""
    ref = tmp_path / "refs" / "tiny"
    empty = tmp_path / "no_refs"
    empty.mkdir()
    assert main(["prepare", "--config", str(_config(tmp_path)), "--cache_dir", str(tmp_path / "origin"),
                 "--reference_dir", str(empty), "--export_reference", str(ref)]) == 0
    assert trained == ["target", "retain"]
    trained.clear()
    return ref


def _prepare(tmp_path: Path, cache: str, *extra: str) -> int:
    return main(["prepare", "--config", str(_config(tmp_path)), "--cache_dir", str(tmp_path / cache),
                 "--reference_dir", str(tmp_path / "refs"), *extra])


@pytest.mark.slow
def test_prepare_uses_a_matching_reference_build_without_training(reference: Path, tmp_path: Path,
                                                                   trained: list[str]) -> None:
    m = json.loads((reference / "manifest.json").read_text())
    assert set(m["keys"]) == set(MODELS) and {k.split("/")[0] for k in m["files"]} == set(MODELS)
    assert "target/model.safetensors" in m["files"] and "target/accuracy.json" not in m["files"]
    assert _prepare(tmp_path, "fresh") == 0
    assert trained == []  # nothing trained: every model came from the build
    done = json.loads((tmp_path / "fresh" / "embedded" / "manifest.json").read_text())
    for stage in MODELS:
        assert done["source"][stage] == f"reference {reference}"
        assert done["hashes"][stage] == m["keys"][stage]
        link = tmp_path / "fresh" / "embedded" / stage
        assert link.resolve().name.startswith(f"{stage}-{m['keys'][stage]}-ref")
        for rel, sha in m["files"].items():  # byte-identical copies
            if rel.startswith(stage + "/"):
                assert rb.sha256_file(link / rel.split("/", 1)[1]) == sha
    assert done["source"]["world"] == "local"
    # the copy loads as a model, and a second prepare re-verifies the cached copy (and trains nothing)
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "fresh" / "embedded" / "target")).num_parameters() > 0
    assert _prepare(tmp_path, "fresh") == 0 and trained == []


@pytest.mark.slow
def test_a_corrupted_or_missing_file_is_refused_naming_it_and_rebuild_trains(
        reference: Path, tmp_path: Path, trained: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    weights = reference / "target" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit pattern in the last byte
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    assert _prepare(tmp_path, "a") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("rerule: error: reference build file")
    assert str(weights) in err and "sha256" in err and "--rebuild" in err
    assert trained == [] and not list((tmp_path / "a").glob("target-*"))  # refused before any work
    # a missing file
    (reference / "tokenizer" / "tokenizer_config.json").unlink()
    assert _prepare(tmp_path, "b") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(reference / "tokenizer" / "tokenizer_config.json") in err
    assert "missing" in err and trained == []
    # --rebuild trains locally (the reference ignored), into the ordinary local cache names
    assert _prepare(tmp_path, "c", "--rebuild") == 0
    assert trained == ["target", "retain"]
    done = json.loads((tmp_path / "c" / "embedded" / "manifest.json").read_text())
    assert set(done["source"].values()) == {"local"}
    assert (tmp_path / "c" / "embedded" / "target").resolve().name == f"target-{done['hashes']['target']}"


@pytest.mark.slow
def test_a_corrupted_cache_copy_or_another_world_is_refused(reference: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert _prepare(tmp_path, "fresh") == 0
    copy = (tmp_path / "fresh" / "embedded" / "retain").resolve() / "config.json"
    copy.write_text(copy.read_text() + " ")
    capsys.readouterr()
    assert _prepare(tmp_path, "fresh") == 2
    err = capsys.readouterr().err
    assert str(copy) in err and "sha256" in err
    # a build trained on another world than the one generated here (same keys) is refused
    m = json.loads((reference / "manifest.json").read_text())
    m["world_texts_sha256"] = "0" * 64
    (reference / "manifest.json").write_text(json.dumps(m))
    assert _prepare(tmp_path, "other") == 2
    assert "not the one it was trained on" in capsys.readouterr().err


def test_the_shipped_build_is_the_default_worlds_and_verifies() -> None:
    cfg = yaml.safe_load((ROOT / "configs" / "embedded" / "prepare.yaml").read_text())
    world = WorldConfig(**cfg["world"])
    keys = prep.cache_keys(world, TinyLlamaConfig(**cfg["model"]), prep.SFTTrainConfig(**cfg["target_training"]),
                           cfg["vocab_size"])
    found = prep.find_references(None, keys)
    assert set(found) == set(MODELS)  # rerule prepare --config configs/embedded/prepare.yaml trains nothing
    (build, m), = {(d, json.dumps(x, sort_keys=True)) for d, x in found.values()}
    m = json.loads(m)
    assert Path(build) == rb.SHIPPED / "embedded"
    for stage in MODELS:
        rb.verify_stage(build, m, stage)
    rb.check_world(build, m, rb.texts_sha256(world_texts(generate_world(world))))
    # small enough to be tracked files: a few MB
    assert sum((Path(build) / rel).stat().st_size for rel in m["files"]) < 10 * 2 ** 20
    # and nothing shipped for the tiny test world: its prepare trains as before
    tiny = prep.cache_keys(WorldConfig(**TINY_WORLD), TinyLlamaConfig(**TINY_MODEL),
                           prep.SFTTrainConfig(**TINY_TRAIN), 512)
    assert prep.find_references(None, tiny) == {}
