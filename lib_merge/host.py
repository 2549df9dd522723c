"""What the engine needs from whoever runs it, and FolderHost, which serves a plain folder.

The protocol speaks of checkpoint names and paths only, never of a host's own objects, so the
webui, a Forge adapter, the standalone app, the CLI and the tests all run the same engine.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from .errors import InputError, shown
from .names import inside, shorten

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
_TITLE_HASH = re.compile(r"\s\[[0-9a-fA-F]{8,64}\]$")


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint file and its name as the webui shows it (relative to the checkpoint folder)."""

    path: Path
    name: str

    @property
    def model_name(self) -> str:
        """The webui's ``CheckpointInfo.model_name``, which the built-in's output names use."""
        return os.path.splitext(self.name.replace("/", "_").replace("\\", "_"))[0]


class Host(Protocol):
    def checkpoints(self) -> list[str]:
        """Names of the checkpoints the user can pick."""

    def resolve(self, name: str) -> Checkpoint:
        """A checkpoint by name or title (``name [hash]``); raises InputError naming it if unknown."""

    def sha256(self, checkpoint: Checkpoint) -> str:
        """The file's sha256, from the host's cache when it has one."""

    def vae_path(self, name: str) -> Path | None:
        """The VAE file for a VAE name, or None when there is no such VAE."""

    def output_dir(self) -> Path:
        """Where merged checkpoints go."""

    def register(self, path: Path, sha256: str) -> str:
        """Make a new checkpoint known (its hash already computed); returns its name or title."""

    def device(self) -> str:
        """The device to merge on when the request says 'auto'."""


class AppHost(Host, Protocol):
    """What the tab and the API need on top of the engine's Host: lists, loading, one job at a time."""

    can_load: bool
    load_by_default: bool
    can_run_code: bool  # a request may name code to import (a greedy soup's scorer): see SECURITY.md

    def refresh(self) -> None:
        """Rescan the checkpoint and VAE folders."""

    def vaes(self) -> list[str]:
        """Names of the VAEs that can be baked in."""

    def devices(self) -> list[str]:
        """Devices a merge can run on here, the host's own first."""

    def load(self, name: str) -> str:
        """Make a checkpoint the host's current model; returns its title."""

    def job(self, task_id: str = "", jobs: int = 1, owner: str = "") -> contextlib.AbstractContextManager:
        """Hold the host's job slot (one merge or generation at a time) for the block, which does ``jobs``
        steps, on behalf of ``owner`` (the page or API client that asked: only it may cancel the job)."""

    def report(self, progress) -> None:
        """Show a merge's progress where the host shows progress."""

    def should_stop(self) -> bool:
        """True once the user asked to cancel the running job."""

    def interrupt(self, owner: str) -> bool:
        """Ask the running job to stop if ``owner`` started it; another's job runs on. True if asked."""


def strip_title(name: str) -> str:
    """``model.safetensors [91f12f22ee]`` -> ``model.safetensors``."""
    return _TITLE_HASH.sub("", name.strip())


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


class FolderHost:
    """A folder of checkpoints: the host of the CLI, the standalone app and the tests.

    Names are paths relative to the folder, and resolve inside it only (``lib_merge.names``): the
    standalone app and recipes hand it names from whoever reaches them. ``allow_paths`` is for the
    CLI, whose paths come from the person at the keyboard: then a path to a file elsewhere resolves
    too (its name is the file name, as in the webui). Hashes are cached by path, size and mtime in a
    JSON file, like the webui's own cache, so an input is hashed once, not at every merge.
    """

    def __init__(
        self,
        models_dir: str | os.PathLike,
        *,
        output_dir=None,
        vae_dir=None,
        device="auto",
        hash_cache: str | os.PathLike | None = None,
        allow_paths: bool = False,
    ):
        self.models_dir = Path(models_dir)
        self._output_dir = Path(output_dir) if output_dir else self.models_dir
        self.vae_dir = Path(vae_dir) if vae_dir else None
        self._device = device
        self.allow_paths = allow_paths
        self._hash_cache = Path(hash_cache) if hash_cache else _default_hash_cache()
        self._job_lock = threading.Lock()
        self._stop = threading.Event()
        self._owner: str | None = None  # who started the running job; None while none runs

    def checkpoints(self) -> list[str]:
        if not self.models_dir.is_dir():
            return []
        files = (p for p in self.models_dir.rglob("*") if p.suffix.lower() in CHECKPOINT_SUFFIXES)
        return sorted(p.relative_to(self.models_dir).as_posix() for p in files if p.is_file())

    def resolve(self, name: str) -> Checkpoint:
        plain = strip_title(name)
        if self.allow_paths:
            in_folder = self.models_dir / plain
            path = in_folder if in_folder.is_file() else Path(plain)
            where = f" (looked in {self.models_dir} and the current folder)"
        else:
            path = inside(self.models_dir, plain, f"model {shown(plain)}")
            if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
                raise InputError(f"{shown(plain)}: not a checkpoint name (expected {' or '.join(CHECKPOINT_SUFFIXES)})")
            where = " in the models folder"
        if not path.is_file():
            raise InputError(f"{shorten(name, 200)}: no such checkpoint{where}")
        return self._checkpoint_at(path)

    def _checkpoint_at(self, path: Path) -> Checkpoint:
        """A file as a checkpoint: named relative to the models folder, or by its file name outside it."""
        try:
            name = path.resolve().relative_to(self.models_dir.resolve()).as_posix()
        except ValueError:
            name = path.name
        return Checkpoint(path, name)

    def sha256(self, checkpoint: Checkpoint) -> str:
        path = checkpoint.path.resolve()
        stat = path.stat()
        stamp = [stat.st_size, stat.st_mtime]
        cache = self._read_cache()
        entry = cache.get(str(path))
        if entry and entry.get("stamp") == stamp:
            return entry["sha256"]
        digest = hash_file(path)
        self._remember(path, digest)
        return digest

    def vae_path(self, name: str) -> Path | None:
        folder = self.vae_dir or self.models_dir
        candidates = [Path(name), folder / name] if self.allow_paths else [inside(folder, name, "bake_in_vae")]
        return next((candidate for candidate in candidates if candidate.is_file()), None)

    def output_dir(self) -> Path:
        return self._output_dir

    def register(self, path: Path, sha256: str) -> str:
        self._remember(Path(path).resolve(), sha256)
        return self._checkpoint_at(Path(path)).name

    def device(self) -> str:
        return default_device() if self._device == "auto" else self._device

    # What the standalone app needs (AppHost): a folder has no current model to load, nor images to
    # score, so no request ever names code for it to import.
    can_load = False
    load_by_default = False
    can_run_code = False

    def refresh(self) -> None:
        pass  # every listing reads the folder afresh

    def vaes(self) -> list[str]:
        folder = self.vae_dir
        if folder is None or not folder.is_dir():
            return []
        files = (p for p in folder.rglob("*") if p.suffix.lower() in (*CHECKPOINT_SUFFIXES, ".pt"))
        return sorted(p.relative_to(folder).as_posix() for p in files if p.is_file())

    def devices(self) -> list[str]:
        return devices_here(self.device())

    def load(self, name: str) -> str:
        raise InputError(f"{name}: this host has no model to load; the file is ready in {self._output_dir}")

    @contextlib.contextmanager
    def job(self, task_id: str = "", jobs: int = 1, owner: str = "") -> Iterator[None]:
        with self._job_lock:
            self._stop.clear()  # a Cancel pressed before this job started is not for it
            self._owner = owner
            try:
                yield
            finally:
                self._owner = None

    def report(self, progress) -> None:
        pass  # a folder has no progress display; the tab and the CLI show their own

    def should_stop(self) -> bool:
        return self._stop.is_set()

    def interrupt(self, owner: str) -> bool:
        if not owner or owner != self._owner:
            return False
        self._stop.set()
        return True

    def _read_cache(self) -> dict:
        try:
            return json.loads(self._hash_cache.read_text())
        except (OSError, ValueError):
            return {}

    def _remember(self, path: Path, digest: str) -> None:
        stat = path.stat()
        cache = self._read_cache()
        cache[str(path)] = {"stamp": [stat.st_size, stat.st_mtime], "sha256": digest}
        try:
            self._hash_cache.parent.mkdir(parents=True, exist_ok=True)
            temp = self._hash_cache.with_suffix(f".{os.getpid()}.tmp")
            temp.write_text(json.dumps(cache, indent=1))
            os.replace(temp, self._hash_cache)
        except OSError:
            pass  # a cache that cannot be written only costs a re-hash next time


def devices_here(preferred: str) -> list[str]:
    """The preferred device first, then the CPU and every GPU this machine has."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += ["cuda"] + [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return [preferred] + [device for device in found if device != preferred]


def hash_file(path: Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def legacy_hash(path: Path) -> str:
    """The webui's old 8-hex model hash: sha256 of 64 KiB at offset 1 MiB."""
    with open(path, "rb") as file:
        file.seek(0x100000)
        return hashlib.sha256(file.read(0x10000)).hexdigest()[:8]


def _default_hash_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "merge-lab" / "hashes.json"
