"""Inputs kept in memory across the merges of a sweep, so each tensor is read from disk once.

A sweep merges the same inputs once per point. Streaming them again at every point would make a
point cost a disk read; the cache keeps each tensor the first merge reads, on the merge device
while it fits (VRAM), else in RAM, else not at all (that tensor is streamed again, as in a plain
merge). Each budget leaves room for what the host still needs: the image generation between
points, the rest of the system.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .formats import open_checkpoint
from .readers import CheckpointReader

GiB = 1 << 30


class InputCache:
    """Tensors read from input files, by file and key; ``open`` gives readers that fill and use it.

    Kept tensors are the file's values, never changed: the engine hands methods copies (or the
    stored tensors to methods that only read them), as it does with a file's pages.
    """

    def __init__(
        self, device: str | torch.device = "cpu", *, vram_budget: int | None = None, ram_budget: int | None = None
    ):
        self.device = torch.device(device)
        on_gpu = self.device.type == "cuda"
        self.vram_left = (vram_budget if vram_budget is not None else _vram_budget(self.device)) if on_gpu else 0
        self.ram_left = ram_budget if ram_budget is not None else _ram_budget()
        self._files: dict[tuple, dict[str, torch.Tensor]] = {}
        self.reads = 0  # tensors read from a file (kept or not): a test's way to see the cache work

    def open(self, path: str | os.PathLike) -> CachedReader:
        path = Path(path)
        stat = path.stat()
        kept = self._files.setdefault((path.resolve(), stat.st_size, stat.st_mtime_ns), {})
        return CachedReader(open_checkpoint(path), kept, self)

    @property
    def kept_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for kept in self._files.values() for t in kept.values())

    def keep(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """A copy of ``tensor`` owned by the cache, where the budgets allow one; else None."""
        size = tensor.numel() * tensor.element_size()
        if size <= self.vram_left:
            self.vram_left -= size
            return tensor.to(self.device, copy=True)
        if size <= self.ram_left:
            self.ram_left -= size
            return tensor.to("cpu", copy=True)  # off the file's map: valid after the reader closes
        return None

    def clear(self) -> None:
        self._files.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def __enter__(self) -> InputCache:
        return self

    def __exit__(self, *exc) -> None:
        self.clear()


class CachedReader(CheckpointReader):
    """A reader that answers from the cache, reading (and keeping) what it does not hold yet."""

    def __init__(self, inner: CheckpointReader, kept: dict[str, torch.Tensor], cache: InputCache):
        self.path, self.metadata, self.format_note = inner.path, inner.metadata, inner.format_note
        self._specs = {key: inner.spec(key) for key in inner.keys()}
        self._inner, self._kept, self._cache = inner, kept, cache

    def __getitem__(self, key: str) -> torch.Tensor:
        tensor = self._kept.get(key)
        if tensor is None:
            self._cache.reads += 1
            tensor = self._inner[key]
            kept = self._cache.keep(tensor)
            if kept is not None:
                self._kept[key] = tensor = kept
        return tensor

    def data_offset(self, key: str) -> int:
        return self._inner.data_offset(key) if hasattr(self._inner, "data_offset") else 0

    def prefetch(self, key: str) -> None:
        if key not in self._kept:
            self._inner.prefetch(key)

    def close(self) -> None:
        self._inner.close()


def _vram_budget(device: torch.device) -> int:
    """Free VRAM less a reserve for generating images: a quarter of the card, 3 GiB at least."""
    free, total = torch.cuda.mem_get_info(device)
    return max(0, free - max(3 * GiB, total // 4))


def _ram_budget() -> int:
    """Available RAM less a reserve for the rest of the system: a fifth of it, 4 GiB at least."""
    available, total = _memory()
    return max(0, available - max(4 * GiB, total // 5))


def _memory() -> tuple[int, int]:
    """(available, total) bytes of RAM; (0, 0) where this system does not tell, which keeps nothing."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        return int(fields["MemAvailable"].split()[0]) * 1024, int(fields["MemTotal"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        pass
    try:
        import psutil  # the webui has it; elsewhere it may be missing

        memory = psutil.virtual_memory()
        return memory.available, memory.total
    except ImportError:
        return 0, 0
