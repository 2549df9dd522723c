"""Task vectors: one delta pipeline (drop -> trim -> sign consensus -> combine) with options.

A task vector is M_i - base. Task arithmetic adds them; TIES trims each to its largest values and
averages only those that agree with the elected sign; DARE drops values at random and rescales
the rest. Randomness comes from a generator seeded by (seed, key name, model index), so a recipe
replays bit for bit.
"""

from __future__ import annotations

import functools
import hashlib
import math
from fractions import Fraction

import torch

from . import BOOL, FLOATS, INT, Param, method

LAMBDA = Param("lambda", 1.0, help="scale of the combined task vector; negative subtracts it")
WEIGHTS = Param("weights", None, FLOATS, help="per task vector lambda, one per model; empty: all 1")
DENSITY = Param("density", 0.2, low=0.0, high=1.0, low_open=True, help="fraction of each task vector kept")
DROP = Param("p", 0.9, low=0.0, high=1.0, high_open=True, help="probability of dropping a delta value")
SEED = Param("seed", 0, INT, help="seed of the drop masks")


@method(
    "task_arithmetic",
    inputs=("base", "models"),
    variadic=1,
    params={"lambda": LAMBDA, "weights": WEIGHTS},
    label="Task arithmetic",
)
def task_arithmetic(
    base: torch.Tensor, *models: torch.Tensor, lambda_: float, weights: tuple[float, ...] | None
) -> torch.Tensor:
    """base + lambda * sum_i w_i (M_i - base) (Ilharco et al. 2023, "Editing models with task arithmetic").

    A negative lambda or weight negates a task vector (forgetting); analogies are add difference.
    """
    weights = weights or (1.0,) * len(models)
    total = models[0].sub_(base).mul_(weights[0])
    for model, weight in zip(models[1:], weights[1:], strict=True):
        total.add_(model.sub_(base), alpha=weight)
    return base.add_(total, alpha=lambda_)


@method(
    "ties",
    inputs=("base", "models"),
    variadic=1,
    params={"density": DENSITY, "lambda": LAMBDA, "weights": WEIGHTS},
    label="TIES",
    elementwise=False,
    stored_inputs=True,
)
def ties(
    base: torch.Tensor, *models: torch.Tensor, density: float, lambda_: float, weights: tuple[float, ...] | None
) -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023): trim each w_i (M_i - base) to its top density fraction by
    magnitude (per tensor), elect each parameter's sign by the sum of the trimmed values, average the
    values that agree with it (disjoint mean), then base + lambda * that mean.

    Two passes over slices of the stored inputs, in float32 (float64 if an input is): the first finds
    each task vector's cut, the second trims, elects and averages. Deltas are recomputed per slice,
    never stored at full size.
    """
    weights = weights or (1.0,) * len(models)
    work = functools.reduce(torch.promote_types, (tensor.dtype for tensor in (base, *models)), torch.float32)
    flat_base = base.reshape(-1)
    vectors = [
        _TaskVector(flat_base, model.reshape(-1), weight, work) for model, weight in zip(models, weights, strict=True)
    ]
    keep = _keep_count(flat_base.numel(), density)
    cuts = [vector.cut(keep) for vector in vectors]
    out = torch.empty(flat_base.shape, dtype=work, device=base.device)
    for piece in _slices(flat_base):
        deltas = [vector.delta(piece) for vector in vectors]
        for index, cut in enumerate(cuts):
            if cut is not None:  # keeps |delta| >= cut: hardshrink keeps |x| > lambd
                deltas[index] = torch.nn.functional.hardshrink(deltas[index], cut)
        torch.add(flat_base[piece].to(work), _disjoint_mean(deltas), alpha=lambda_, out=out[piece])
    return out.view(base.shape)


@method(
    "dare",
    inputs=("base", "models"),
    variadic=1,
    params={
        "p": DROP,
        "lambda": LAMBDA,
        "weights": WEIGHTS,
        "seed": SEED,
        "sign_election": Param("sign_election", False, BOOL, help="DARE-TIES: average only values agreeing in sign"),
    },
    label="DARE",
    elementwise=False,
    keyed=True,
    float32=True,
)
def dare(
    base: torch.Tensor,
    *models: torch.Tensor,
    p: float,
    lambda_: float,
    weights: tuple[float, ...] | None,
    seed: int,
    sign_election: bool,
    key: str,
) -> torch.Tensor:
    """DARE (Yu et al. 2024, "Language models are Super Mario"): drop each value of w_i (M_i - base)
    with probability p, rescale the kept ones by 1 / (1 - p), then add the sum times lambda to base;
    with sign_election, TIES' sign election and disjoint mean instead of the sum (DARE-TIES).
    """
    deltas = _deltas(base, models, weights)
    if p > 0:
        for index, delta in enumerate(deltas):
            keep = torch.rand(delta.shape, generator=_generator(seed, key, index)) >= p
            delta.mul_(keep.to(delta.device)).div_(1 - p)
    combined = _disjoint_mean(deltas) if sign_election else _sum(deltas)
    return base.add_(combined, alpha=lambda_)


def _deltas(base: torch.Tensor, models, weights) -> list[torch.Tensor]:
    """w_i (M_i - base), computed in the models' own buffers."""
    weights = weights or (1.0,) * len(models)
    return [model.sub_(base).mul_(weight) for model, weight in zip(models, weights, strict=True)]


def _keep_count(n: int, density: float) -> int:
    """ceil(density * n), exactly: 0.55 * 100 is 55, not 55.000000000000014."""
    return min(n, math.ceil(Fraction(repr(density)) * n))


# Slices this long stay in the CPU's cache through a dozen operations; elsewhere one slice is best.
CPU_SLICE = 1 << 18
# Up to this size torch.kthvalue beats radix selection, whose histograms cost the same at any size.
SMALL_SELECTION = 1 << 15
# Values drawn to bracket a task vector's cut before the exact count.
SAMPLE_SIZE = 1 << 16


def _slices(flat: torch.Tensor) -> list[slice]:
    n = flat.numel()
    step = CPU_SLICE if flat.device.type == "cpu" else max(n, 1)
    return [slice(start, start + step) for start in range(0, n, step)]


class _TaskVector:
    """w (M - base) over flat stored tensors, computed slice by slice in the work dtype when asked."""

    def __init__(self, base: torch.Tensor, model: torch.Tensor, weight: float, work: torch.dtype):
        self.base, self.model, self.weight, self.work = base, model, weight, work

    def delta(self, piece: slice) -> torch.Tensor:
        delta = self.model[piece].to(self.work).sub(self.base[piece].to(self.work))
        return delta if self.weight == 1 else delta.mul_(self.weight)

    def cut(self, keep: int) -> float | None:
        """The largest threshold below the keep-th largest magnitude (None: everything is kept).

        A strided sample brackets the keep-th largest between two of its values; one counting pass
        then finds how many lie above the bracket and gathers the few inside it, where the exact
        value is picked. If the sample misjudged the bracket, radix selection over the whole vector.
        """
        n = self.base.numel()
        if keep >= n:
            return None
        if n <= 4 * SAMPLE_SIZE:
            return _below(_kth_largest(self.delta(slice(0, n)).abs_(), keep))
        stride = n // SAMPLE_SIZE
        sample = self.delta(slice(0, n, stride)).abs_().sort(descending=True).values
        rank = keep / n * sample.numel()
        margin = 4 * math.sqrt(rank * (1 - keep / n)) + 8
        high = sample[max(int(rank - margin), 0)]
        low = sample[min(int(rank + margin), sample.numel() - 1)]
        above, inside = 0, []
        for piece in _slices(self.base):
            magnitude = self.delta(piece).abs_()
            at_least_low = magnitude >= low
            count = int(torch.count_nonzero(at_least_low))
            inside.append(magnitude[at_least_low.logical_and_(magnitude <= high)])
            above += count - inside[-1].numel()
        band = torch.cat(inside)
        rank_in_band = keep - above
        if 0 < rank_in_band <= band.numel():
            return _below(band.kthvalue(band.numel() - rank_in_band + 1).values)
        return _below(_kth_largest(self.delta(slice(0, n)).abs_(), keep))


def _below(cut: torch.Tensor) -> float | None:
    """The float just below ``cut``, so |x| > it means |x| >= cut; None when the cut is 0."""
    if float(cut) == 0:
        return None
    return float(torch.nextafter(cut, torch.zeros_like(cut)))


_INT_VIEW = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def _kth_largest(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest of non-negative floats, exactly, by radix selection on their bit patterns.

    Non-negative floats sort like their bits read as integers, so 16 bits at a time a histogram
    (torch.bincount) finds the digit of the k-th largest: two linear passes for float32, several
    times faster than torch.kthvalue's selection on the CPU, except on small inputs.
    """
    if magnitude.numel() <= SMALL_SELECTION:
        return magnitude.flatten().kthvalue(magnitude.numel() - k + 1).values
    bits = magnitude.flatten().view(_INT_VIEW[magnitude.dtype])
    if bits.dtype == torch.int16:
        bits = bits.to(torch.int32)
    shift = magnitude.element_size() * 8 - 16
    found, remaining = 0, k
    while shift >= 0:
        digits = (bits >> shift) & 0xFFFF
        from_top = torch.bincount(digits, minlength=1 << 16).flip(0).cumsum(0)
        index = int(torch.searchsorted(from_top, remaining))
        remaining -= int(from_top[index - 1]) if index else 0
        digit = 0xFFFF - index
        found |= digit << shift
        bits = bits[digits == digit]
        shift -= 16
    return torch.tensor(found, dtype=_INT_VIEW[magnitude.dtype]).view(magnitude.dtype).to(magnitude.device)


def _disjoint_mean(deltas: list[torch.Tensor]) -> torch.Tensor:
    """Per parameter: the mean of the values whose sign agrees with the sign of their sum.

    Float operations only, in the deltas' own buffers (they are consumed): with s the elected sign,
    relu(s * d) is |d| where d agrees and 0 elsewhere, and as the agreeing values share the sign s,
    s * sum(|d|) is their sum exactly. Comparisons into boolean masks are several times slower.
    """
    elected = deltas[0].clone()
    for delta in deltas[1:]:
        elected.add_(delta)
    elected.sign_()
    agreeing = [delta.mul_(elected).relu_() for delta in deltas]
    count = agreeing[0].sign()
    for magnitude in agreeing[1:]:
        count.add_(magnitude.sign())
    return _sum(agreeing).mul_(elected).div_(count.clamp_min_(1))


def _sum(deltas: list[torch.Tensor]) -> torch.Tensor:
    total = deltas[0]
    for delta in deltas[1:]:
        total.add_(delta)
    return total


def _generator(seed: int, key: str, index: int) -> torch.Generator:
    """A CPU generator seeded by (seed, key, model index): the same masks on every run and device."""
    digest = hashlib.sha256(f"{seed}\0{key}\0{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
