"""Output precision: the dtype each output tensor is written in, and the one rounding into it.

A request's ``dtype`` chooses: "" or "builtin" (the built-in's: the type promotion of the inputs,
and ``save_as_half`` turning float32 into float16), "keep" (the primary's dtype at each key: the
output has only the primary's keys, the built-in's rule), or fp32, fp16, bf16, fp8_e4m3fn or
fp8_e5m2 for every floating-point tensor of the model's parts. Integer and bool tensors (position
ids) never change, nor do the noise schedule's buffers (``alphas_cumprod``, ``betas`` ...: the keys
with no module in their name), which the webui samples with.

Where rounding happens: the engine computes in float64 (float32 on MPS, and in the methods that
compute in float32) and rounds each result once, into the output tensor (``rounding``). With a
chosen precision that is ``round_into``: to nearest, ties to even. torch turns float64 into 16- and
8-bit floats through float32, which rounds twice, one unit in the last place off where the first
rounding lands exactly halfway between two neighbours of the target (in a weighted sum of two fp16
models, about one value in 200). So float64 values are first rounded to odd at two bits more than
the target keeps, which float32 holds exactly, and torch's one rounding of that is the correct one
(Boldo and Melquiond, "Emulation of FMA and correctly rounded sums"). The built-in's precision ("")
keeps torch's conversion, so its outputs stay byte for byte what they were.

fp8 saturates: a value beyond the largest finite one (448 for e4m3fn, 57344 for e5m2) becomes that
value with its sign, never inf or NaN; so does an input's own ±inf (e4m3fn has none, and one rule
keeps every fp8 output free of inf). NaN stays NaN. fp16 and bf16 overflow to ±inf, as IEEE
rounding (and the built-in's to_half) does.
"""

from __future__ import annotations

import threading

import torch

from .errors import RequestError, shown

# The output precisions a request may name, with their dtypes ("keep" has none of its own).
DTYPES: dict[str, torch.dtype | None] = {
    "keep": None,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
# The default's name where "" cannot be shown (the tab's dropdown, the CLI): read as "".
BUILTIN = "builtin"
CHOICES = (BUILTIN, *DTYPES)
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
# Significand bits (the leading one included) of the formats torch reaches from float64 via float32.
SIGNIFICAND_BITS = {torch.float16: 11, torch.bfloat16: 8, torch.float8_e4m3fn: 4, torch.float8_e5m2: 3}
FLOAT64_FRACTION_BITS = 52


def check_choice(dtype, save_as_half: bool) -> str:
    """The request's ``dtype`` ("" for the built-in's), or a RequestError naming the field (and
    save_as_half when the two ask for different precisions)."""
    if dtype is None or dtype == BUILTIN:
        return ""
    if not isinstance(dtype, str) or (dtype and dtype not in DTYPES):
        raise RequestError(
            f"dtype: unknown output precision {shown(dtype)} (one of {', '.join(DTYPES)}; or empty or "
            f"{BUILTIN} for the built-in's: the inputs' type, float32 to float16 with save_as_half)"
        )
    if save_as_half and dtype not in ("", "fp16"):
        raise RequestError(
            f"save_as_half and dtype: Save as float16 asks for float16 but dtype asks for {dtype}; "
            "untick save_as_half, or leave dtype empty"
        )
    return dtype


def output_dtype(key: str, choice: str, natural: torch.dtype, primary: torch.dtype) -> torch.dtype:
    """The dtype of one output tensor: ``natural`` is the built-in's (type promotion, to_half
    applied), ``primary`` the primary model's dtype at that key. Only floating tensors of the
    model's parts change: a key with no module in its name is a buffer of the noise schedule
    (``alphas_cumprod``, ``betas`` ...), which the webui samples with, and keeps its dtype (in fp8
    alphas_cumprod would keep 3 bits of its 52 and the images would change)."""
    if not choice or not natural.is_floating_point or "." not in key:
        return natural
    if choice == "keep":
        return primary if primary.is_floating_point else natural
    return DTYPES[choice]


def describe(choice: str, save_as_half: bool) -> str:
    """The precision in words, for the preflight report."""
    if not choice:
        half = ", float32 saved as float16" if save_as_half else ""
        return f"as the built-in: the inputs' type promotion{half}"
    if choice == "keep":
        return "the primary model's dtype at each key"
    dtype = DTYPES[choice]
    limit = f", saturating at ±{torch.finfo(dtype).max:g}" if dtype in FP8 else ""
    return f"every floating-point tensor in {choice}{limit}, rounded once to nearest"


def rounding(choice: str):
    """How the engine puts a result into its output tensor: ``round_into`` for a chosen precision,
    torch's conversion (``Tensor.copy_``) for the built-in's, whose bytes stay as they were."""
    return round_into if choice else torch_conversion


def torch_conversion(out: torch.Tensor, value: torch.Tensor) -> None:
    """torch's conversion: float64 to 16- and 8-bit floats through float32 (it rounds twice)."""
    out.copy_(value)


def round_into(out: torch.Tensor, value: torch.Tensor) -> None:
    """Copy ``value`` into ``out`` rounded once to ``out``'s dtype (nearest, ties to even); fp8
    saturates. ``value`` is never written to (it may be an input's own pages)."""
    if value.dtype != torch.float64 or out.dtype not in SIGNIFICAND_BITS:
        out.copy_(saturated(value, out.dtype) if out.dtype in FP8 else value)
    elif (
        value.device.type == "cpu" and value.is_contiguous() and out.is_contiguous() and value.numel() > ROUNDING_CHUNK
    ):
        _round_in_chunks(out.view(-1), value.view(-1))
    else:
        _round_piece(out, value)


# Elements rounded at a time on the CPU: the bit operations' scratch stays in the core's cache, and
# no tensor the size of ``value`` is made (measured on 2 cores: 5x faster on a 6.5M-value key).
ROUNDING_CHUNK = 1 << 17


def _round_in_chunks(out: torch.Tensor, value: torch.Tensor) -> None:
    scratch = _scratch()
    for start in range(0, value.numel(), ROUNDING_CHUNK):
        stop = min(start + ROUNDING_CHUNK, value.numel())
        _round_piece(out[start:stop], value[start:stop], scratch)


def _round_piece(out: torch.Tensor, value: torch.Tensor, scratch: tuple | None = None) -> None:
    """One piece: saturated for fp8, rounded to odd at two bits more than ``out`` keeps, then
    torch's conversion (through float32, exact from there)."""
    if out.dtype in FP8:
        value = saturated(value, out.dtype)
    out.copy_(rounded_to_odd(value, SIGNIFICAND_BITS[out.dtype] + 2, scratch))


_thread_scratch = threading.local()


def _scratch() -> tuple[torch.Tensor, torch.Tensor]:
    """This thread's two int64 buffers for ``rounded_to_odd`` (merges may run on several threads)."""
    if not hasattr(_thread_scratch, "buffers"):
        _thread_scratch.buffers = tuple(torch.empty(ROUNDING_CHUNK, dtype=torch.int64) for _ in range(2))
    return _thread_scratch.buffers


def saturated(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``value`` clamped to ``dtype``'s finite range, ±inf included (a new tensor); NaN stays NaN."""
    limit = torch.finfo(dtype).max
    return value.clamp(-limit, limit)


def rounded_to_odd(value: torch.Tensor, bits: int, scratch: tuple | None = None) -> torch.Tensor:
    """float64 ``value`` cut to ``bits`` significant bits, the last one set where any bit was cut
    (round to odd): rounding this to nearest at ``bits - 2`` bits or fewer gives what rounding
    ``value`` itself would, and it is exact in float32 wherever the targets here are not zero.

    Integer operations on the bits: the sign and exponent are untouched; an inf has no fraction
    bits to cut; a NaN keeps a fraction bit set, so it stays NaN. ``scratch``: two int64 buffers of
    at least ``value``'s size to work in (the result is a view of the second), else new tensors.
    """
    cut = FLOAT64_FRACTION_BITS - (bits - 1)
    low = (1 << cut) - 1
    raw = value.view(torch.int64)
    if scratch is None:
        sticky, kept = torch.empty_like(raw), torch.empty_like(raw)
    else:
        sticky, kept = (buffer[: raw.numel()].view(raw.shape) for buffer in scratch)
    torch.bitwise_and(raw, low, out=sticky)
    sticky.add_(low).bitwise_and_(low + 1)  # 1 << cut where any cut bit was set, else 0
    torch.bitwise_and(raw, ~low, out=kept)
    return kept.bitwise_or_(sticky).view(torch.float64)
