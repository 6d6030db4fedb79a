"""The decoded-folder cache: each folder decoded once into a uint8 .npy with a JSON manifest.

A cache is keyed by the folder's listing (every file's relative path, size and mtime) and the
image size, so a changed folder gets a new one. Before use its size and sha256 are checked
against the manifest: a truncated, altered or half-written cache is rebuilt, never trained
on. A lock file serialises builders, so two processes never write one cache at once (the
second waits and then uses the first one's). `edgessl cache list|clean` shows and removes them.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from edgessl.errors import EdgesslError
from edgessl.runfiles import atomic_write


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgessl"


def cache_path(listing: list, size: int, fit: str) -> Path:
    head = f"{size} {fit}\n"
    key = hashlib.sha256(head.encode() + "\n".join(f"{f}\t{n}\t{t}" for f, n, t in listing)
                         .encode(errors="surrogateescape"))
    return cache_dir() / f"folder-{key.hexdigest()[:16]}.npy"


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_manifest(npy: Path):
    """The manifest of a cache that is whole (sizes and checksum agree), else None."""
    try:
        manifest = json.loads(npy.with_suffix(".json").read_text())
        if npy.stat().st_size != manifest["npy_bytes"] or file_sha256(npy) != manifest["npy_sha256"]:
            return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextmanager
def locked(npy: Path):
    """An exclusive lock on the cache's .lock file, released when the holder exits (or dies)."""
    npy.parent.mkdir(parents=True, exist_ok=True)
    with open(npy.with_suffix(".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def folder_cache(root: Path, listing: list, size: int, build: Callable[[Path], tuple[int, list]],
                 fit: str) -> tuple[Path, dict]:
    """(cache .npy, manifest) for a folder listing, built by `build(tmp_npy) -> (count, skipped)`
    when missing or damaged."""
    npy = cache_path(listing, size, fit)
    manifest = read_manifest(npy) if npy.exists() else None
    if manifest is not None:
        os.utime(npy.with_suffix(".json"))  # last used, for `edgessl cache clean --older-than`
        return npy, manifest
    with locked(npy):
        manifest = read_manifest(npy)  # another process may have built it while this one waited
        if manifest is not None:
            return npy, manifest
        if npy.exists() or npy.with_suffix(".json").exists():
            sys.stderr.write(f"note: the decoded cache {npy} is damaged (size or checksum); rebuilding it\n")
        tmp = npy.with_suffix(f".tmp{os.getpid()}.npy")
        try:
            count, skipped = build(tmp)
            digest, nbytes = file_sha256(tmp), tmp.stat().st_size
            os.replace(tmp, npy)
        except OSError as e:
            raise EdgesslError(f"folder: cannot write the decoded cache {npy} ({e.strerror or e})") from None
        finally:
            tmp.unlink(missing_ok=True)
        manifest = {"root": str(root), "image_size": size, "fit": fit, "count": count, "skipped": skipped, "files": listing,
                    "npy_bytes": nbytes, "npy_sha256": digest}
        atomic_write(npy.with_suffix(".json"), json.dumps(manifest, indent=0))
        return npy, manifest


def list_caches() -> list[dict]:
    """Every cache under cache_dir(): path, folder, image size, images, bytes, last used, whole."""
    out = []
    for npy in sorted(cache_dir().glob("folder-*.npy")):
        if ".tmp" in npy.name:
            continue
        try:
            manifest = json.loads(npy.with_suffix(".json").read_text())
        except (OSError, ValueError):
            manifest = {}
        st = npy.stat()
        used = npy.with_suffix(".json").stat().st_mtime if manifest else st.st_mtime
        out.append({"path": str(npy), "root": manifest.get("root", "?"), "image_size": manifest.get("image_size"),
                    "count": manifest.get("count"), "bytes": st.st_size, "last_used": used,
                    "whole": st.st_size == manifest.get("npy_bytes")})
    return out


def clean(older_than_days: float = 0.0) -> list[str]:
    """Remove the caches not used for `older_than_days` (0: all) that no process holds; their paths."""
    removed = []
    cutoff = time.time() - older_than_days * 86400
    for entry in list_caches():
        npy = Path(entry["path"])
        if entry["last_used"] > cutoff and older_than_days > 0:
            continue
        with open(npy.with_suffix(".lock"), "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # being built right now
            for p in (npy, npy.with_suffix(".json")):
                p.unlink(missing_ok=True)
            fcntl.flock(f, fcntl.LOCK_UN)
        npy.with_suffix(".lock").unlink(missing_ok=True)
        removed.append(str(npy))
    return removed
