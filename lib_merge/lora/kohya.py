"""What LoRA extraction and merging share: kohya's module names for checkpoint layers, the SVD that
turns a weight change into ``lora_up`` / ``lora_down``, and the atomic writing of a kohya LoRA file.

Names: kohya's sd-scripts names a UNet layer in diffusers' layout for SD1 and SD2
(``lora_unet_down_blocks_0_attentions_0_proj_in``) and as the checkpoint does for SDXL
(``lora_unet_input_blocks_4_1_proj_in``), the text encoders ``lora_te_`` (SD1, SD2) or ``lora_te1_`` /
``lora_te2_`` (SDXL) in Hugging Face's CLIP names. ``names.py`` holds the one mapping (LoRA name ->
layer); the names made here are its inverse, and each is checked against it before it is used, so
every name written is one the reader (and the webui) maps back to the same layer.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import arch
from ..engine import Progress, ProgressFn, StopFn
from ..errors import CancelledError, OutputError, RequestError
from ..io.readers import TensorSpec
from ..io.writer import SafetensorsWriter, remove_leftovers
from .names import RESNET_PARTS, LayerIndex, Target, layer_name, lora_layer_names

# The families whose checkpoints kohya's extraction knows (and whose key names the rules below follow).
FAMILIES = (arch.SD1, arch.SD2, arch.SDXL)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
UNET = "model.diffusion_model."
# torch.quantile refuses inputs of more than 2**24 elements; beyond, kthvalue gives the same value.
QUANTILE_LIMIT = 1 << 24

# The layers kohya's networks.lora makes modules for (checkpoint module paths): every Linear and
# Conv2d inside a Transformer2DModel always; with a conv rank also those of ResnetBlock2D,
# Downsample2D and Upsample2D; in the text encoders, CLIPAttention's and CLIPMLP's Linears.
_ATTENTION = re.compile(
    r"(?:input_blocks\.\d+|middle_block|output_blocks\.\d+)\.\d+\."
    r"(?:proj_in|proj_out|transformer_blocks\.\d+\.(?:attn[12]\.(?:to_q|to_k|to_v|to_out\.0)|ff\.net\.(?:0\.proj|2)))"
)
_RESNET = re.compile(
    r"(?:input_blocks\.\d+\.0|middle_block\.[02]|output_blocks\.\d+\.0)\."
    r"(?:in_layers\.2|out_layers\.3|emb_layers\.1|skip_connection)"
    r"|input_blocks\.\d+\.0\.op|output_blocks\.\d+\.[12]\.conv"
)
_CLIP = re.compile(r"text_model\.encoder\.layers\.\d+\.(?:self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])")
_OPEN_CLIP = re.compile(r"transformer\.resblocks\.\d+\.(?:attn\.out_proj|mlp\.c_fc|mlp\.c_proj)")
_OPEN_CLIP_QKV = re.compile(r"transformer\.resblocks\.\d+\.attn")
_TEXT_PREFIXES = (
    "cond_stage_model.transformer.",  # SD1's CLIP-L
    "cond_stage_model.model.",  # SD2's OpenCLIP-H
    "conditioner.embedders.0.transformer.",  # SDXL's CLIP-L
    "conditioner.embedders.1.model.",  # SDXL's OpenCLIP-G
)


@dataclass(frozen=True)
class LayerModule:
    """One module of an extracted LoRA: its kohya name, the checkpoint key whose change it holds
    (for a fused q/k/v, the ``third`` of that key's rows), and the change's shape (out, in, *kernel)."""

    name: str
    key: str
    shape: tuple[int, ...]
    third: int | None = None
    text_encoder: bool = False

    @property
    def conv3x3(self) -> bool:
        return len(self.shape) == 4 and tuple(self.shape[2:]) != (1, 1)


def layer_modules(
    keys: Iterable[str], shape_of: Callable[[str], tuple[int, ...]], family: str, *, conv: bool, text_encoder: bool
) -> list[LayerModule]:
    """The modules kohya's LoRA has for a checkpoint of ``family`` with these keys: the attention
    layers, the resnets and samplers where ``conv`` (a conv rank is given), the text encoders' where
    ``text_encoder``; named for that family, each name checked against ``names.py``."""
    keys = list(keys)
    index = LayerIndex(keys)
    modules = []
    for key in keys:
        found = _module_path(key, conv=conv, text_encoder=text_encoder)
        if found is None:
            continue
        module, fused = found
        shape = tuple(shape_of(key))
        if len(shape) not in (2, 4):
            continue
        thirds = (0, 1, 2) if fused else (None,)
        for third in thirds:
            part_shape = (shape[0] // 3, *shape[1:]) if fused else shape
            layer = layer_name(module) + (f"_{'qkv'[third]}_proj" if fused else "")
            name = kohya_name(layer, family)
            if name is None or index.find(name) != Target(module, third):
                raise AssertionError(f"no kohya name maps back to {key}")  # names.py and this file disagree
            modules.append(LayerModule(name, key, part_shape, third, not key.startswith(UNET)))
    return modules


def _module_path(key: str, *, conv: bool, text_encoder: bool) -> tuple[str, bool] | None:
    """(module path, whether it is a fused q/k/v) of a key kohya's LoRA patches; else None."""
    if key.startswith(UNET) and key.endswith(".weight"):
        module = key[: -len(".weight")]
        rest = module[len(UNET) :]
        if _ATTENTION.fullmatch(rest) or (conv and _RESNET.fullmatch(rest)):
            return module, False
        return None
    if not text_encoder:
        return None
    for prefix in _TEXT_PREFIXES:
        if key.startswith(prefix):
            rest = key[len(prefix) :]
            if rest.endswith(".in_proj_weight") and _OPEN_CLIP_QKV.fullmatch(rest[: -len(".in_proj_weight")]):
                return key[: -len(".in_proj_weight")], True
            if rest.endswith(".weight") and (_CLIP.fullmatch(rest[:-7]) or _OPEN_CLIP.fullmatch(rest[:-7])):
                return key[: -len(".weight")], False
    return None


def kohya_name(layer: str, family: str) -> str | None:
    """kohya's name of the LoRA module for the webui's layer ``layer`` in a ``family`` model: the
    inverse of ``names.lora_layer_names``; None for a layer kohya's names do not reach."""
    if layer.startswith("diffusion_model_"):
        rest = layer[len("diffusion_model_") :]
        diffusers = _to_diffusers(rest) if family in (arch.SD1, arch.SD2) else None
        return "lora_unet_" + (diffusers or rest)
    for start, prefix in (("transformer_", "lora_te_"), ("0_transformer_", "lora_te1_")):
        if layer.startswith(start + "text_model_"):
            return prefix + layer[len(start) :]
    for start, prefix in (("model_", "lora_te_"), ("1_model_", "lora_te2_")):
        if layer.startswith(start + "transformer_resblocks_"):
            clip = _from_open_clip(layer[len(start) :])
            return prefix + clip if clip else None
    return None


_RESNET_NAMES = {ldm: diffusers for diffusers, ldm in RESNET_PARTS.items()}
_LDM = re.compile(r"(input_blocks|middle_block|output_blocks)_(?:(\d+)_)?(\d+)_(.+)")
_OPEN_CLIP_LAYER = re.compile(r"transformer_resblocks_(\d+)_(.+)")
_OPEN_CLIP_PARTS = {"mlp_c_fc": "mlp_fc1", "mlp_c_proj": "mlp_fc2"}


def _to_diffusers(rest: str) -> str | None:
    """An SD1/SD2 UNet layer (checkpoint names, ``input_blocks_1_1_proj_in``) in diffusers' layout."""
    match = _LDM.fullmatch(rest)
    if not match:
        return None
    part, sub = match[4], int(match[3])
    if match[1] == "middle_block":
        if sub == 1:
            return f"mid_block_attentions_0_{part}"
        return _resnet(f"mid_block_resnets_{sub // 2}", part)
    number = int(match[2])
    if match[1] == "input_blocks":
        if number == 0:
            return None
        block, index = divmod(number - 1, 3)
        if index == 2:
            return f"down_blocks_{block}_downsamplers_0_conv" if part == "op" else None
        return (
            f"down_blocks_{block}_attentions_{index}_{part}"
            if sub == 1
            else _resnet(f"down_blocks_{block}_resnets_{index}", part)
        )
    block, index = divmod(number, 3)
    if sub > 0 and part == "conv":
        return f"up_blocks_{block}_upsamplers_0_conv"
    return (
        f"up_blocks_{block}_attentions_{index}_{part}"
        if sub == 1
        else _resnet(f"up_blocks_{block}_resnets_{index}", part)
    )


def _resnet(start: str, part: str) -> str | None:
    return f"{start}_{_RESNET_NAMES[part]}" if part in _RESNET_NAMES else None


def _from_open_clip(rest: str) -> str | None:
    """An OpenCLIP layer (``transformer_resblocks_0_attn_out_proj``) in Hugging Face CLIP's names."""
    match = _OPEN_CLIP_LAYER.fullmatch(rest)
    if not match:
        return None
    part = _OPEN_CLIP_PARTS.get(match[2]) or ("self_" + match[2] if match[2].startswith("attn_") else None)
    return f"text_model_encoder_layers_{match[1]}_{part}" if part else None


def output_name(name: str, family: str) -> str:
    """A LoRA module's name in kohya's spelling for ``family`` (a diffusers / PEFT ``unet....`` name
    becomes ``lora_unet_...``), checked to map to the same layer; a name it cannot convert is kept."""
    layers = lora_layer_names(name)
    if family in (arch.SD1, arch.SD2):  # their text encoder, not SDXL's first (0_) or second (1_)
        layers = [layer for layer in layers if not layer.startswith(("0_", "1_"))] or layers
    for layer in layers:
        converted = kohya_name(layer, family)
        if converted is not None and lora_layer_names(converted)[:1] == [layer]:
            return converted
    return name


# ---------------------------------------------------------------- SVD


def rank_for(shape: Sequence[int], rank: int, conv_rank: int | None) -> int:
    """The rank of a module of change ``shape``: ``conv_rank`` for a 3x3 conv (``rank`` without
    one), ``rank`` otherwise, capped at the most the change can have: min(out, in x kernel)."""
    wanted = conv_rank if conv_rank is not None and len(shape) == 4 and tuple(shape[2:]) != (1, 1) else rank
    return max(1, min(wanted, shape[0], math.prod(shape[1:])))


def low_rank(change: torch.Tensor, rank: int, clamp_quantile: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """kohya's SVD of a change (out, in, *kernel): ``up`` = U[:, :rank] diag(S[:rank]), ``down`` =
    Vh[:rank], both clamped to [-hi, hi] with hi the ``clamp_quantile`` quantile of their values
    (kohya's rule; 1 clamps nothing), shaped as a LoRA's factors (up 1x1 for a conv)."""
    matrix = change.reshape(change.shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    up, down = u[:, :rank] * s[:rank], vh[:rank]
    if clamp_quantile < 1:
        hi = quantile(torch.cat([up.flatten(), down.flatten()]), clamp_quantile)
        up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
    return as_factors(up, down, change.shape)


def as_factors(up: torch.Tensor, down: torch.Tensor, shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Matrices up (out, r) and down (r, in x kernel) shaped as kohya stores a layer of ``shape``."""
    if len(shape) == 4:
        return up.reshape(*up.shape, 1, 1), down.reshape(down.shape[0], *shape[1:])
    return up, down


def quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(values, q)`` (linear interpolation), also past torch's limit of 2**24
    elements: there from two ``kthvalue`` calls, which have no limit (the rank in float64)."""
    values = values.flatten()
    if values.numel() <= QUANTILE_LIMIT:
        return torch.quantile(values, q)
    position = q * (values.numel() - 1)
    below = math.floor(position)
    low = values.kthvalue(below + 1).values
    if position == below:
        return low
    high = values.kthvalue(below + 2).values
    return torch.lerp(low, high, position - below)


# ---------------------------------------------------------------- writing


@dataclass
class LoraResult:
    """A written LoRA file: its path, sha256, module count and what the user should know."""

    path: Path
    sha256: str
    modules: int
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Factors:
    """One module's tensors as written: up, down and alpha (alpha = rank: a scale of 1)."""

    name: str
    up: torch.Tensor
    down: torch.Tensor


def module_specs(name: str, shape: Sequence[int], rank: int, dtype: torch.dtype) -> list[tuple[str, TensorSpec]]:
    """The three keys of a kohya module of ``rank`` for a change of ``shape``, in the order written."""
    conv = len(shape) == 4
    return [
        (f"{name}.lora_down.weight", TensorSpec(dtype, (rank, *shape[1:]))),
        (f"{name}.lora_up.weight", TensorSpec(dtype, (shape[0], rank, *([1, 1] if conv else [])))),
        (f"{name}.alpha", TensorSpec(torch.float32, ())),  # float32: bf16 cannot hold every rank
    ]


def check_output(output: Path, inputs: Sequence[Path], overwrite: bool) -> None:
    """OutputError for an output that is an input (always) or exists (unless ``overwrite``), not a
    .safetensors file, or in a folder that does not exist: before anything is read or written."""
    if output.suffix.lower() != ".safetensors":
        raise OutputError(f"{output}: a LoRA is written as .safetensors; name the output *.safetensors")
    for path in inputs:
        try:
            same = output.exists() and output.samefile(path)
        except OSError:
            same = False
        if same:
            raise OutputError(f"{output}: is one of the inputs; it is never overwritten")
    if output.exists() and not overwrite:
        raise OutputError(f"{output}: already exists; give --overwrite to replace it")
    if not output.parent.is_dir():
        raise OutputError(f"{output.parent}: no such folder")


def check_options(rank: int | None, conv_rank: int | None, dtype: str) -> None:
    """RequestError naming the option: ranks are whole numbers of at least 1, dtype one of DTYPES."""
    for option, value in (("--rank", rank), ("--conv-rank", conv_rank)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise RequestError(f"{option}: a rank is a whole number of at least 1, got {value!r}")
    if dtype not in DTYPES:
        raise RequestError(f"--dtype: one of {', '.join(DTYPES)}, got {dtype!r}")


def write_lora(
    output: Path,
    specs: list[tuple[str, TensorSpec]],
    metadata: dict[str, str],
    factors: Iterator[Factors],
    *,
    overwrite: bool,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> str:
    """Write the modules ``factors`` yields, in ``specs``' order, as a kohya LoRA: streamed (one
    module in memory), to a temp file renamed into place at the end; returns its sha256."""
    remove_leftovers(output.parent)
    expected = {key: spec for key, spec in specs}
    total, done = len(specs) // 3, 0
    bytes_total = sum(spec.nbytes for _, spec in specs)
    bytes_done = 0
    writer = SafetensorsWriter(output, specs, metadata or None, overwrite=overwrite)
    try:
        for module in factors:
            if should_stop is not None and should_stop():
                raise CancelledError("stopped; nothing was written")
            down_key, up_key = f"{module.name}.lora_down.weight", f"{module.name}.lora_up.weight"
            for key, tensor in ((down_key, module.down), (up_key, module.up)):
                spec = expected[key]
                writer.add(key, tensor.to("cpu", spec.dtype).reshape(spec.shape).contiguous())
                bytes_done += spec.nbytes
            writer.add(f"{module.name}.alpha", torch.tensor(float(module.down.shape[0]), dtype=torch.float32))
            done += 1
            if progress is not None:
                progress(Progress(done, total, bytes_done, bytes_total, module.name))
        return writer.finish()
    except BaseException:
        writer.abort()
        raise


def network_metadata(family: str, rank: int, conv_rank: int | None, title: str) -> dict[str, str]:
    """The training metadata kohya's extraction writes, which the webui's Lora extension reads
    (``ss_network_module`` as "Kohya module", ``ss_base_model_version`` / ``ss_v2`` for the SD
    version it filters by) and ``family.py`` reads back (``ss_base_model_version``)."""
    version = {arch.SD1: "sd_v1", arch.SD2: "sd_v2", arch.SDXL: "sdxl_base_v1-0"}.get(family)
    architecture = {
        arch.SD1: "stable-diffusion-v1",
        arch.SD2: "stable-diffusion-v2-512",
        arch.SDXL: "stable-diffusion-xl-v1-base",
    }.get(family)
    args = {"conv_dim": str(conv_rank), "conv_alpha": str(float(conv_rank))} if conv_rank is not None else {}
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(rank)),
        "ss_network_args": json.dumps(args),
    }
    if version:  # where it is not known, none: the webui takes any other "ss_v2" as SD1 or SD2
        metadata["ss_base_model_version"] = version
        metadata["ss_v2"] = str(family == arch.SD2)
    if architecture:
        metadata.update(
            {
                "modelspec.sai_model_spec": "1.0.0",
                "modelspec.architecture": f"{architecture}/lora",
                "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
                "modelspec.title": title,
            }
        )
    return metadata
