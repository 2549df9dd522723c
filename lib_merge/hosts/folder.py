"""FolderHost: a plain folder of checkpoints, the host of the CLI, the standalone app and the tests."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from ..errors import InputError, shown
from ..names import inside, shorten
from . import (
    CHECKPOINT_SUFFIXES,
    LORA_SUFFIXES,
    VAE_SUFFIXES,
    Checkpoint,
    default_device,
    devices_here,
    hash_file,
    list_files,
    lora_in_folder,
    strip_title,
)


class FolderHost:
    """A folder of checkpoints: the host of the CLI, the standalone app and the tests.

    Names are paths relative to the folder, and resolve inside it only (``lib_merge.names``): the
    standalone app and recipes hand it names from whoever reaches them. ``allow_paths`` is for the
    CLI, whose paths come from the person at the keyboard: then a path to a file elsewhere resolves
    too (its name is the file name, as in the webui). LoRA names resolve the same way in
    ``lora_dir``, where extracted and merged LoRAs go. Hashes are cached by path, size and mtime in a
    JSON file, like the webui's own cache, so an input is hashed once, not at every merge.
    """

    def __init__(
        self,
        models_dir: str | os.PathLike,
        *,
        output_dir=None,
        vae_dir=None,
        lora_dir=None,
        device="auto",
        hash_cache: str | os.PathLike | None = None,
        allow_paths: bool = False,
    ):
        self.models_dir = Path(models_dir)
        self._output_dir = Path(output_dir) if output_dir else self.models_dir
        self.vae_dir = Path(vae_dir) if vae_dir else None
        self.lora_folder = Path(lora_dir) if lora_dir else None
        self._device = device
        self.allow_paths = allow_paths
        self._hash_cache = Path(hash_cache) if hash_cache else _default_hash_cache()
        self._job_lock = threading.Lock()
        self._stop = threading.Event()
        self._owner: str | None = None  # who started the running job; None while none runs

    def checkpoints(self) -> list[str]:
        return list_files(self.models_dir, CHECKPOINT_SUFFIXES)

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

    def resolve_lora(self, name: str) -> Checkpoint:
        folder = self.lora_folder
        if not self.allow_paths:
            if folder is None:
                raise InputError(f"LoRA {shown(name)}: this app has no LoRA folder (start it with --lora-dir)")
            return lora_in_folder(folder, name)
        in_folder = folder / name if folder else None
        path = in_folder if in_folder and in_folder.is_file() else Path(name)
        if not path.is_file():
            where = f" (looked in {folder} and the current folder)" if folder else ""
            raise InputError(f"{shorten(name, 200)}: no such LoRA{where}")
        return self._checkpoint_at(path, folder, lora=True)

    def _checkpoint_at(self, path: Path, folder: Path | None = None, *, lora: bool = False) -> Checkpoint:
        """A file as a checkpoint (or LoRA): named relative to its folder, or by its file name outside it."""
        try:
            name = path.resolve().relative_to((folder or self.models_dir).resolve()).as_posix()
        except ValueError:
            name = path.name
        return Checkpoint(path, name, lora)

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
        return list_files(self.vae_dir, VAE_SUFFIXES)

    def loras(self) -> list[str]:
        return list_files(self.lora_folder, LORA_SUFFIXES)

    def lora_dir(self) -> Path:
        if self.lora_folder is None:
            raise InputError("this app has no LoRA folder to save LoRAs in (start it with --lora-dir)")
        return self.lora_folder

    def register_lora(self, path: Path) -> str:
        return self._checkpoint_at(Path(path), self.lora_folder, lora=True).name

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


def _default_hash_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "merge-lab" / "hashes.json"
