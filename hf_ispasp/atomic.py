"""Writing a checkpoint folder without ever losing a file: stage, then move only our files into place.

A checkpoint is several files (``config.json``, weights, tokenizer files) that must agree with each other, and the
target folder may hold files we did not write (notes, data, other runs, the user's project when the output folder
is ``.``). So a save

1. writes the whole checkpoint into a fresh staging folder next to the target (same filesystem);
2. if the target does not exist, renames the staging folder onto it (one atomic step);
3. otherwise writes a journal (``.hf_ispasp-save.json``, atomically) naming the complete staging folder, replaces
   our files in the target one by one with ``os.replace`` (each atomic), deletes files that only the previous save
   of ours wrote (listed in our manifest ``.hf_ispasp-manifest.json``), writes the new manifest, then removes the
   journal and the staging folder.

An interrupt before the journal exists leaves the old checkpoint untouched; while the journal exists the complete
new checkpoint is in the staging folder and :func:`readable_folder` (used by ``load_pruned``) reads it from
there; after the journal is gone the new checkpoint is in place. Files we did not write are never deleted,
moved or modified.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
import tempfile
from collections.abc import Callable

__all__ = ["JOURNAL", "MANIFEST", "CheckpointFolderError", "atomic_directory", "foreign_files", "readable_folder"]

MANIFEST = ".hf_ispasp-manifest.json"
JOURNAL = ".hf_ispasp-save.json"
_STAGING_PREFIX = ".hf_ispasp-staging-"
# Weight files whose stale presence would make a folder ambiguous to a loader (an index shadows a single file).
_WEIGHT_PATTERNS = ("model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors",
                    "pytorch_model*.bin", "pytorch_model.bin.index.json")


class CheckpointFolderError(OSError):
    """The output path cannot hold a checkpoint (it is a file, or holds conflicting files we did not write)."""


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_json_atomic(path: str, data: object) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _relative_files(root: str) -> list[str]:
    out = []
    for folder, _, files in os.walk(root):
        for name in files:
            out.append(os.path.relpath(os.path.join(folder, name), root))
    return sorted(out)


def _read_manifest(folder: str) -> set[str]:
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as f:
            return set(json.load(f).get("files", []))
    except (OSError, ValueError, AttributeError):
        return set()


def foreign_files(folder: str | os.PathLike) -> list[str]:
    """Files in ``folder`` that no save of ours wrote (empty when the folder does not exist)."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return []
    ours = {name.split(os.sep)[0] for name in _read_manifest(folder)} | {MANIFEST, JOURNAL}
    return sorted(name for name in os.listdir(folder) if name not in ours)


def readable_folder(path: str) -> str:
    """The folder that holds the complete checkpoint at ``path``: the staging folder of an interrupted save."""
    journal = os.path.join(path, JOURNAL)
    if os.path.isfile(journal):
        try:
            with open(journal, encoding="utf-8") as f:
                staging = os.path.join(os.path.dirname(os.path.abspath(path)), json.load(f)["staging"])
        except (OSError, ValueError, KeyError, TypeError):
            return path
        if os.path.isdir(staging):
            return staging
    return path


def _place(src: str, dst: str) -> None:
    """Atomically put a copy of ``src`` at ``dst`` (hard link when possible, so the staging copy stays whole)."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(dst))
    os.close(fd)
    try:
        os.unlink(tmp)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _check_conflicts(path: str, new: list[str], previous: set[str]) -> None:
    """Refuse a folder whose stale weight files we did not write would shadow the new ones for a loader."""
    conflicts = [
        f for f in sorted(os.listdir(path))
        if f not in new and f not in previous and any(fnmatch.fnmatch(f, p) for p in _WEIGHT_PATTERNS)
    ]
    if conflicts:
        raise CheckpointFolderError(
            f"{path} already holds weight files written by something else ({conflicts[:5]}) that would be read "
            "instead of the new checkpoint; move them away or save into an empty folder (nothing was changed)"
        )


def atomic_directory(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Run ``write(staging_dir)`` and put its files at ``path`` without losing anything (see the module doc).

    Raises:
        CheckpointFolderError: ``path`` is an existing file, or holds weight files we did not write that would
            shadow the new ones. Nothing is written in that case.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointFolderError(
            f"{path} is an existing file, not a folder; a checkpoint is a folder: choose another path"
        )
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    _clean_interrupted(path)
    staging = tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=parent)
    journal = os.path.join(path, JOURNAL)
    try:
        write(staging)
        new = _relative_files(staging)
        _write_json_atomic(os.path.join(staging, MANIFEST), {"files": new})
        if not os.path.exists(path):
            try:
                os.rename(staging, path)
                _fsync_dir(parent)
                return
            except OSError:
                if not os.path.isdir(path):  # created meanwhile by someone else: merge below
                    raise
                os.makedirs(path, exist_ok=True)
        previous = _read_manifest(path)
        _check_conflicts(path, new, previous)
        _write_json_atomic(journal, {"staging": os.path.basename(staging)})
        _switch(staging, path, new, previous)
        os.unlink(journal)
    except BaseException:
        if not os.path.exists(journal):  # before the switch began: the old checkpoint is untouched
            shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)


def _switch(staging: str, path: str, new: list[str], previous: set[str]) -> None:
    """Replace our files one by one, delete what only our previous save wrote, then record the new manifest.

    The manifest goes last, so an interrupted switch still lists every stale file of ours for the roll-forward.
    """
    for name in new:
        _place(os.path.join(staging, name), os.path.join(path, name))
    for name in sorted(previous - set(new) - {MANIFEST, JOURNAL}):
        stale = os.path.join(path, name)
        if os.path.isfile(stale):  # written by our previous save and not by this one
            os.unlink(stale)
    _place(os.path.join(staging, MANIFEST), os.path.join(path, MANIFEST))
    _fsync_dir(path)


def _clean_interrupted(path: str) -> None:
    """Finish an interrupted save at ``path`` (roll forward from its complete staging folder)."""
    journal = os.path.join(path, JOURNAL)
    if not os.path.isfile(journal):
        return
    staging = readable_folder(path)
    if staging == path:  # the staging folder is gone: nothing to roll forward
        os.unlink(journal)
        return
    _switch(staging, path, sorted(_read_manifest(staging)), _read_manifest(path))
    os.unlink(journal)
    shutil.rmtree(staging, ignore_errors=True)
