"""What the engine needs from whoever runs it: the Host protocol, and helpers every host shares.

The protocol speaks of checkpoint names and paths only, never of a host's own objects, so the
webui, a Forge adapter, the standalone app, the CLI and the tests all run the same engine.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ..io.sequential_reads import file_blocks

# What a models folder lists as checkpoints: Forge lists GGUF files too (read, never written).
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".gguf")
VAE_SUFFIXES = (".safetensors", ".ckpt", ".pt")
# What the webui's Lora extension lists in its LoRA folder.
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")
_TITLE_HASH = re.compile(r"\s\[[0-9a-fA-F]{8,64}\]$")


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint file and its name as the webui shows it (relative to the checkpoint folder);
    ``lora`` for a LoRA file, named relative to the LoRA folder."""

    path: Path
    name: str
    lora: bool = False

    @property
    def model_name(self) -> str:
        """The webui's ``CheckpointInfo.model_name``, which the built-in's output names use."""
        return os.path.splitext(self.name.replace("/", "_").replace("\\", "_"))[0]


class Host(Protocol):
    def checkpoints(self) -> list[str]:
        """Names of the checkpoints the user can pick."""

    def resolve(self, name: str) -> Checkpoint:
        """A checkpoint by name or title (``name [hash]``); raises InputError naming it if unknown."""

    def resolve_lora(self, name: str) -> Checkpoint:
        """A LoRA file by name (relative to the host's LoRA folder); raises InputError naming it if unknown."""

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

    def loras(self) -> list[str]:
        """Names of the LoRA files in the host's LoRA folder (relative paths)."""

    def lora_dir(self) -> Path:
        """Where extracted and merged LoRAs go: the folder the host's LoRA loader lists."""

    def register_lora(self, path: Path) -> str:
        """Make a new LoRA file known to the host's LoRA list (and cards); returns its name."""

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


def resolve_lora(host: Host, name: str) -> Checkpoint:
    """``host.resolve_lora(name)``; a host made before LoRAs (one that lacks it) refuses by name."""
    from ..errors import InputError

    if not hasattr(host, "resolve_lora"):
        raise InputError(f"LoRA {name}: this host has no LoRA folder")
    return host.resolve_lora(name)


def lora_in_folder(folder: Path, name: str) -> Checkpoint:
    """A LoRA named relative to ``folder``, resolved inside it only (names come from requests)."""
    from ..errors import InputError, shown
    from ..names import inside, shorten

    plain = name.strip() if isinstance(name, str) else name
    path = inside(folder, plain, f"LoRA {shown(plain)}")
    if path.suffix.lower() not in LORA_SUFFIXES:
        raise InputError(f"{shown(plain)}: not a LoRA file name (expected {' or '.join(LORA_SUFFIXES)})")
    if not path.is_file():
        raise InputError(f"{shorten(plain, 200)}: no such LoRA in the LoRA folder")
    return Checkpoint(path, path.relative_to(folder).as_posix(), lora=True)


def list_files(folder: Path | None, suffixes: tuple[str, ...]) -> list[str]:
    """The files under ``folder`` with one of ``suffixes``, as sorted paths relative to it."""
    if folder is None or not folder.is_dir():
        return []
    files = (p for p in folder.rglob("*") if p.suffix.lower() in suffixes)
    return sorted(p.relative_to(folder).as_posix() for p in files if p.is_file())


def strip_title(name: str) -> str:
    """``model.safetensors [91f12f22ee]`` -> ``model.safetensors``."""
    return _TITLE_HASH.sub("", name.strip())


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


def devices_here(preferred: str) -> list[str]:
    """The preferred device first, then the CPU and every GPU this machine has."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += ["cuda"] + [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return [preferred] + [device for device in found if device != preferred]


def hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    for block in file_blocks(path):
        digest.update(block)
    return digest.hexdigest()


def legacy_hash(path: Path) -> str:
    """The webui's old 8-hex model hash: sha256 of 64 KiB at offset 1 MiB."""
    with open(path, "rb") as file:
        file.seek(0x100000)
        return hashlib.sha256(file.read(0x10000)).hexdigest()[:8]


# Each host is its own module, the only one that imports its host's code: folder.py (the CLI, the
# standalone app, the tests), webui.py (AUTOMATIC1111's webui), forge.py (Forge). The folder host has
# no host code, so it is part of the package's public API.
from .folder import FolderHost  # noqa: E402, F401
