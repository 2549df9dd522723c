"""Tiny checkpoints with real SD key names, made on the fly in each test's temp folder."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import safetensors.torch
import torch

from lib_merge import FolderHost
from lib_merge.io.readers import TensorSpec
from lib_merge.synthetic import layout, scaled, with_dtype, write_checkpoint

SD15 = scaled(layout("sd15"), max_dim=4)
SDXL = scaled(layout("sdxl"), max_dim=4)
UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def variant_specs(specs: dict[str, TensorSpec], channels: int) -> dict[str, TensorSpec]:
    """The same model with a UNet of ``channels`` input channels (9: inpainting, 8: pix2pix)."""
    spec = specs[UNET_IN]
    return {**specs, UNET_IN: TensorSpec(spec.dtype, (spec.shape[0], channels, *spec.shape[2:]))}


def make(path: Path, specs=SD15, seed: int = 0, dtype: torch.dtype | None = None, metadata=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_checkpoint(path, with_dtype(specs, dtype) if dtype else specs, seed, metadata)


def load(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(path))


def ulp(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of ``dtype`` at each (float64) value, subnormals included."""
    info = torch.finfo(dtype)
    mantissa = {
        torch.float8_e5m2: 2, torch.float8_e4m3fn: 3, torch.float16: 10, torch.bfloat16: 7, torch.float32: 23,
        torch.float64: 52,
    }[dtype]  # fmt: skip
    exponent = torch.floor(torch.log2(value.abs().clamp_min(info.tiny)))
    return torch.exp2(exponent - mantissa).clamp_min(info.smallest_normal * 2.0**-mantissa)


def assert_within_one_ulp(actual: torch.Tensor, exact: torch.Tensor, key: str = "") -> None:
    error = (actual.double() - exact).abs()
    bound = ulp(exact, actual.dtype)
    worst = (error / bound).max().item() if error.numel() else 0.0
    assert worst <= 1.0, f"{key}: {worst:.2f} ulp off"


@pytest.fixture
def models(tmp_path) -> Path:
    """A checkpoint folder with A, B, C: small SD1.5-layout fp16 models."""
    folder = tmp_path / "models"
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        make(folder / f"{name}.safetensors", seed=seed)
    return folder


@pytest.fixture
def host(models, tmp_path) -> FolderHost:
    return FolderHost(models, hash_cache=tmp_path / "hashes.json", device="cpu")


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MiB tmpfs, so the disk really fills up (needs root, which CI has)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)
