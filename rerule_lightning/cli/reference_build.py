"""Reference builds: prepared tokenizers and models shipped as checksummed files, so that every machine evaluates
the same embedded target and retain models (float32 training differs across CPUs; a local build of the same
config is another model).

A reference build is a directory holding ``manifest.json`` and one sub-folder per stage (``tokenizer``,
``target``, ``retain``). The manifest records, per stage, the cache key ``rerule prepare`` computes for it (the
hash of the world content, vocabulary, model shape and training config: :func:`rerule_lightning.cli.prepare.prepare`),
the sha256 of every file, and the sha256 of the world texts the models were trained on. ``rerule prepare`` looks
for a build whose key equals the one it needs (in :data:`SHIPPED`, or ``--reference_dir``), verifies every
checksum (a missing or changed file is a one-line :class:`ReferenceBuildError` naming it), and copies it into the
cache instead of training; ``--rebuild`` trains locally instead. ``rerule prepare --export_reference DIR`` writes
a build from the prepared artefacts.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
from pathlib import Path
from typing import Any

#: The builds shipped with the package (tracked files: they survive a fresh clone and ``pip install``).
SHIPPED = Path(__file__).resolve().parent / "reference_builds"
STAGES = ("tokenizer", "target", "retain")
MANIFEST = "manifest.json"
FORMAT = 1
#: Files of a prepared artefact that are measured on each machine, never shipped.
LOCAL_ONLY = {"accuracy.json"}


class ReferenceBuildError(ValueError):
    """A reference build is unreadable, incomplete or does not match its checksums (the message names the file)."""


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def texts_sha256(texts: list[str]) -> str:
    """Hex sha256 of the world texts (one per line): what the tokenizer and the models were trained on."""
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()


def _stage_files(directory: str) -> list[str]:
    return sorted(n for n in os.listdir(directory)
                  if os.path.isfile(os.path.join(directory, n)) and n not in LOCAL_ONLY)


def write_reference(out_dir: str, sources: dict[str, str], keys: dict[str, str], world_sha256: str,
                    config: dict[str, Any]) -> str:
    """Copy the prepared ``sources`` (stage -> directory) into ``out_dir`` and write its manifest.

    Args:
        out_dir: The reference build's directory (created; an existing build there is replaced).
        sources: The prepared artefact of each of :data:`STAGES`.
        keys: Each stage's cache key.
        world_sha256: :func:`texts_sha256` of the world texts.
        config: The prepare config the build came from (recorded for people, not checked).

    Returns:
        The manifest's path.
    """
    files: dict[str, str] = {}
    for stage in STAGES:
        dest = os.path.join(out_dir, stage)
        shutil.rmtree(dest, ignore_errors=True)
        os.makedirs(dest)
        for name in _stage_files(sources[stage]):
            shutil.copyfile(os.path.join(sources[stage], name), os.path.join(dest, name))
            files[f"{stage}/{name}"] = sha256_file(os.path.join(dest, name))
    import torch
    import transformers

    manifest = {"format": FORMAT, "keys": {s: keys[s] for s in STAGES}, "world_texts_sha256": world_sha256,
                "files": files, "config": config,
                "built_on": {"machine": platform.machine(), "processor": platform.processor(),
                             "python": platform.python_version(), "torch": torch.__version__,
                             "transformers": transformers.__version__}}
    path = os.path.join(out_dir, MANIFEST)
    with open(path, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
    return path


def load_manifest(build_dir: str) -> dict[str, Any]:
    """The manifest of a reference build, checked for its fields.

    Raises:
        ReferenceBuildError: Unreadable JSON or a missing field (naming the file).
    """
    path = os.path.join(build_dir, MANIFEST)
    try:
        with open(path) as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        raise ReferenceBuildError(f"reference build {path}: unreadable manifest ({e})") from None
    missing = [k for k in ("format", "keys", "files", "world_texts_sha256") if k not in m]
    if missing or m.get("format") != FORMAT:
        raise ReferenceBuildError(f"reference build {path}: not a format-{FORMAT} manifest (missing {missing or 'none'}"
                                  f", format {m.get('format')!r})")
    return m


def find_reference(root: str | os.PathLike, stage: str, key: str) -> tuple[str, dict[str, Any]] | None:
    """The reference build under ``root`` (``root`` itself or one of its sub-directories) whose ``stage`` has
    cache key ``key``, with its manifest; ``None`` when no build there matches."""
    root = str(root)
    if not os.path.isdir(root):
        return None
    candidates = [root] + [os.path.join(root, d) for d in sorted(os.listdir(root))
                           if os.path.isdir(os.path.join(root, d))]
    for d in candidates:
        if os.path.isfile(os.path.join(d, MANIFEST)):
            m = load_manifest(d)
            if m["keys"].get(stage) == key:
                return d, m
    return None


def verify_stage(build_dir: str, manifest: dict[str, Any], stage: str, directory: str | None = None) -> None:
    """Check every file of ``stage`` against the manifest's sha256, in the build or in a copy of it.

    Args:
        build_dir: The reference build (named in errors).
        manifest: Its manifest.
        stage: One of :data:`STAGES`.
        directory: Where the stage's files are (default ``build_dir/stage``; a cache copy in ``rerule prepare``).

    Raises:
        ReferenceBuildError: A file is missing or its sha256 differs (naming the file and both digests).
    """
    directory = directory or os.path.join(build_dir, stage)
    wanted = {rel.split("/", 1)[1]: sha for rel, sha in manifest["files"].items() if rel.split("/", 1)[0] == stage}
    if not wanted:
        raise ReferenceBuildError(f"reference build {build_dir}: its manifest lists no {stage} file")
    for name, sha in sorted(wanted.items()):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise ReferenceBuildError(f"reference build file {path} is missing (listed in {build_dir}/{MANIFEST}); "
                                      f"restore it (git checkout) or pass --rebuild to train locally")
        got = sha256_file(path)
        if got != sha:
            raise ReferenceBuildError(f"reference build file {path}: sha256 {got[:16]}… differs from the manifest's "
                                      f"{sha[:16]}… (corrupted or replaced); restore it (git checkout) or pass "
                                      f"--rebuild to train locally")


def check_world(build_dir: str, manifest: dict[str, Any], world_sha256: str) -> None:
    """The world generated here must be the one the build was trained on (same key, same texts).

    Raises:
        ReferenceBuildError: The world texts' sha256 differs (a generator change without a version bump).
    """
    if manifest["world_texts_sha256"] != world_sha256:
        raise ReferenceBuildError(f"reference build {build_dir}: the world generated here (texts sha256 "
                                  f"{world_sha256[:16]}…) is not the one it was trained on "
                                  f"({manifest['world_texts_sha256'][:16]}…); pass --rebuild to train locally")


def install_stage(build_dir: str, manifest: dict[str, Any], stage: str, dest: str) -> None:
    """Verify the build's ``stage`` files, copy them into ``dest`` (a fresh directory) and verify the copy."""
    verify_stage(build_dir, manifest, stage)
    os.makedirs(dest)
    for rel in manifest["files"]:
        s, name = rel.split("/", 1)
        if s == stage:
            shutil.copyfile(os.path.join(build_dir, stage, name), os.path.join(dest, name))
    verify_stage(build_dir, manifest, stage, dest)
