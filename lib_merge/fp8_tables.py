"""Elementwise steps over fp8 inputs, by table: the same bytes as float64 slice by slice, many times faster.

An fp8 element is one of 256 values, so an elementwise step over k fp8 inputs (k <= 3) meets at
most 256**k combinations of inputs. The table holds the step's result for every one, computed as
the slice-by-slice path computes each element (the method on float64 copies of the inputs, then the
engine's one rounding into the output dtype), so looking each element up by its inputs' bytes
writes the same bytes. On 2 CPU cores a Flux merge of fp8 files is bound by this arithmetic (the
float64 path turns about 20 M elements a second, a lookup about 200 M); the table is what lets it
keep pace with the disk.

A table is built once per method, parameter values and dtypes, and kept while the merge runs:
block weights give one per distinct value. Three inputs make 16.7 M entries, worth building only
for a tensor of a few million elements or more (the first such tensor pays for the rest).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from .steps import Step

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
MAX_INPUTS = 3
BUILD_ROWS = 1 << 16  # table entries computed at once: 1.5 MiB of float64 per input
CACHE_BYTES = 256 << 20  # the tables kept; the least recently used goes first
# A table is built for a tensor of at least entries / BUILD_SHARE elements: building costs about
# what the float64 path would for that many elements, and the tensors after it are nearly free.
BUILD_SHARE = 4
_INTEGER_VIEWS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_VALUES = {  # every fp8 value, in float64, by its byte
    dtype: torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).to(torch.float64) for dtype in FP8
}

Rounding = Callable[[torch.Tensor, torch.Tensor], None]
Call = Callable[[Step, list, str], torch.Tensor]


class Fp8Tables:
    """The tables of one merge, and their use: ``apply`` returns False where a table does not fit."""

    def __init__(self, round_into: Rounding, call: Call):
        self._round_into = round_into
        self._call = call
        self._tables: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._index = torch.empty(0, dtype=torch.int32)

    def apply(self, step: Step, key: str, inputs: Sequence[torch.Tensor | None], out: torch.Tensor, chunk: int) -> bool:
        """Write ``step`` over the flat ``inputs`` into the flat ``out`` by table, slice by slice;
        False (nothing written) when the inputs are not all fp8, or the table would not pay."""
        present = [tensor for tensor in inputs if tensor is not None]
        if not _fits(step, present, out):
            return False
        table = self._table(step, key, [tensor.dtype for tensor in inputs], out.dtype, out.numel())
        if table is None:
            return False
        codes = [tensor.view(torch.uint8) for tensor in present]
        if self._index.numel() < chunk:
            self._index = torch.empty(chunk, dtype=torch.int32)
        entries, sink = table.view(_INTEGER_VIEWS[table.itemsize]), out.view(_INTEGER_VIEWS[out.itemsize])
        total = out.numel()
        for start in range(0, total, chunk):
            stop = min(start + chunk, total)
            index = self._index[: stop - start]
            index.copy_(codes[0][start:stop])
            for more in codes[1:]:
                index.bitwise_left_shift_(8).add_(more[start:stop])
            torch.index_select(entries, 0, index, out=sink[start:stop])
        return True

    def _table(self, step: Step, key: str, dtypes: list, out_dtype: torch.dtype, numel: int) -> torch.Tensor | None:
        name = (step.method.name, tuple(sorted(step.params.items())), tuple(dtypes), out_dtype)
        table = self._tables.get(name)
        if table is not None:
            self._tables.move_to_end(name)
            return table
        entries = 256 ** sum(dtype is not None for dtype in dtypes)
        if numel * BUILD_SHARE < entries:
            return None
        table = self._build(step, key, dtypes, out_dtype, entries)
        self._tables[name] = table
        while sum(kept.nbytes for kept in self._tables.values()) > CACHE_BYTES and len(self._tables) > 1:
            self._tables.popitem(last=False)
        return table

    def _build(self, step: Step, key: str, dtypes: list, out_dtype: torch.dtype, entries: int) -> torch.Tensor:
        """The step at every combination of input bytes, the first input's byte the most significant."""
        table = torch.empty(entries, dtype=out_dtype)
        count = sum(dtype is not None for dtype in dtypes)
        for start in range(0, entries, BUILD_ROWS):
            rows = torch.arange(start, min(start + BUILD_ROWS, entries), dtype=torch.int64)
            args, place = [], count
            for dtype in dtypes:
                if dtype is None:
                    args.append(None)
                    continue
                place -= 1
                args.append(_VALUES[dtype][(rows >> (8 * place)) & 255])  # a fresh float64 copy
            self._round_into(table[start : start + rows.numel()], self._call(step, args, key))
        return table


def _fits(step: Step, present: list[torch.Tensor], out: torch.Tensor) -> bool:
    # A keyed method may change with the key: its table would serve one key only.
    return (
        0 < len(present) <= MAX_INPUTS
        and not step.method.keyed
        and all(tensor.dtype in FP8 for tensor in present)
        and out.itemsize in _INTEGER_VIEWS
        and all(_hashable(value) for value in step.params.values())
    )


def _hashable(value) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True
