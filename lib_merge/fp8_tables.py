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

Those 16.7 M entries do not stay in a core's cache, and a lookup that misses it costs more than
the rest of the step. Add difference, A + alpha (B - C), reads B and C only as B - C, so many (B, C)
byte pairs give the same results for every A. Where such classes of pairs are few, the table is
stored in two parts: each pair's class, then the results by class and A. For add difference into
fp8 e4m3fn that is 16,704 classes, 4.3 MB, and a lookup about 1.6x as fast (microbenchmark on
this machine's EPYC: 2.7 against 4.4 ns an element). The classes are found in the table itself,
so the split is exact for any method: a class is the set of pairs with identical results.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise

import torch

from .steps import Step

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
MAX_INPUTS = 3
BUILD_ROWS = 1 << 16  # table entries computed at once: 1.5 MiB of float64 per input
CACHE_BYTES = 256 << 20  # the tables kept; the least recently used goes first
# A table is built for a tensor of at least entries / BUILD_SHARE elements: building costs about
# what the float64 path would for that many elements, and the tensors after it are nearly free.
BUILD_SHARE = 4
PAIRS = 1 << 16
MAX_CLASSES = PAIRS // 2  # past this a two-part table is not small enough to repay its second lookup
_INTEGER_VIEWS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_VALUES = {  # every fp8 value, in float64, by its byte
    dtype: torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).to(torch.float64) for dtype in FP8
}

Rounding = Callable[[torch.Tensor, torch.Tensor], None]
Call = Callable[[Step, list, str], torch.Tensor]


class Fp8Tables:
    """The tables of one merge, and their use: ``apply`` returns False where a table does not fit.

    A tensor of many slices is looked up by ``helpers`` threads besides the caller, each taking a
    span of it: with the inputs read and the output written by other threads, the lookups are what
    the merge waits for (a Flux add difference to bf16: about 5.5 ns an element, 65 s on one core).
    """

    def __init__(self, round_into: Rounding, call: Call, helpers: int = 0):
        self._round_into = round_into
        self._call = call
        self._tables: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._index = [torch.empty(0, dtype=torch.int32) for _ in range(helpers + 1)]  # per thread
        self._helpers = None
        if helpers:
            # Torch's thread count is per thread: one each, beside the caller's.
            self._helpers = ThreadPoolExecutor(
                helpers, thread_name_prefix="merge-lab-lookup", initializer=torch.set_num_threads, initargs=(1,)
            )

    def close(self) -> None:
        if self._helpers is not None:
            self._helpers.shutdown()

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
        sink = out.view(_INTEGER_VIEWS[out.itemsize])
        spans = _spans(out.numel(), chunk, len(self._index))
        helped = [
            self._helpers.submit(self._look_up, table, codes, sink, span, chunk, self._index[number + 1])
            for number, span in enumerate(spans[1:])
        ]
        self._look_up(table, codes, sink, spans[0], chunk, self._index[0])
        for done in helped:
            done.result()
        return True

    def _look_up(self, table, codes: list, sink: torch.Tensor, span: tuple[int, int], chunk: int, scratch) -> None:
        """Elements ``span`` of ``sink`` by ``table``, slice by slice, in ``scratch`` (grown in place)."""
        if scratch.numel() < 2 * chunk:
            scratch.resize_(2 * chunk)
        for start in range(span[0], span[1], chunk):
            stop = min(start + chunk, span[1])
            index, classes = scratch[: stop - start], scratch[chunk : chunk + stop - start]
            parts = [part[start:stop] for part in codes]
            if isinstance(table, _TwoPartTable):
                index.copy_(parts[1]).bitwise_left_shift_(8).add_(parts[2])
                torch.index_select(table.classes, 0, index, out=classes)
                torch.index_select(table.results, 0, classes.add_(parts[0]), out=sink[start:stop])
                continue
            index.copy_(parts[0])
            for more in parts[1:]:
                index.bitwise_left_shift_(8).add_(more)
            torch.index_select(table, 0, index, out=sink[start:stop])

    def _table(self, step: Step, key: str, dtypes: list, out_dtype: torch.dtype, numel: int):
        """The step's table (flat, by the inputs' bytes as integers), a _TwoPartTable, or None."""
        name = (step.method.name, tuple(sorted(step.params.items())), tuple(dtypes), out_dtype)
        table = self._tables.get(name)
        if table is not None:
            self._tables.move_to_end(name)
            return table
        entries = 256 ** sum(dtype is not None for dtype in dtypes)
        if numel * BUILD_SHARE < entries:
            return None
        flat = self._build(step, key, dtypes, out_dtype, entries).view(_INTEGER_VIEWS[out_dtype.itemsize])
        table = _TwoPartTable.split(flat) if entries == 256**3 else None
        self._tables[name] = table = table if table is not None else flat
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


class _TwoPartTable:
    """A three-input table as ``results[classes[B, C] + A]``: ``classes`` gives each (B, C) byte
    pair the offset of its class, the pairs whose results are the same for every A."""

    def __init__(self, classes: torch.Tensor, results: torch.Tensor):
        self.classes, self.results = classes, results
        self.nbytes = classes.nbytes + results.nbytes

    @classmethod
    def split(cls, flat: torch.Tensor) -> _TwoPartTable | None:
        """``flat`` (A's byte the most significant) in two parts, or None where too many classes."""
        columns = flat.view(256, PAIRS).t()  # a pair's results, for every A
        distinct, class_of_pair = torch.unique(columns, dim=0, return_inverse=True)
        if distinct.shape[0] > MAX_CLASSES:
            return None
        return cls((class_of_pair * 256).to(torch.int32), distinct.reshape(-1))


def _spans(total: int, chunk: int, threads: int) -> list[tuple[int, int]]:
    """``[0, total)`` in at most ``threads`` spans of whole slices (one where there are few slices)."""
    slices = -(-total // chunk)
    threads = max(1, min(threads, slices // 2))
    bounds = [min(total, slices * number // threads * chunk) for number in range(threads + 1)]
    return list(pairwise(bounds))


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
