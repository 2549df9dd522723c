"""The merge loop: for each output key, the method on the device, then the writer.

Read, compute and write overlap: the next keys' inputs (``PREFETCH_BYTES`` ahead) are asked for
while this key is computed on the main thread (a LoRA bake's rows on several: ``_Compute._bake``),
straight into its place in the writer's staging buffer, which threads hash and write
(``io/staged_writer.py``). Where the inputs and the output fit in the memory available, an input
the page cache holds already (loaded by the host, merged just before) is read through it, any
other past it by a thread of its own (``io/direct_reads.py``), and the output is written past it,
or into a mapped file (``io/mapped_writer.py``) where the OS cannot; where they do not fit (Flux on
24 GB), every input is read past the page cache and the output written through it. Without
fallocate: into reused buffers, written by a thread.
Arithmetic is in float64 on the CPU and CUDA (float32 on MPS, which has no float64), and the
result is rounded once to the output dtype (``precision.rounding``: with a chosen precision to
nearest, ties to even, fp8 saturating; else torch's conversion, as before), so every value is
within one unit in the last place of the exact result, whatever the multiplier. Elementwise steps
over fp8 inputs look each element up in a table of those same results (``fp8_tables.py``). Memory
holds small float64 scratch buffers and a few output tensors, never a model.
"""

from __future__ import annotations

import os
import queue
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from itertools import pairwise
from pathlib import Path

import torch

from .errors import CancelledError, IncompatibleModelsError, RequestError
from .fp8_tables import Fp8Tables
from .io.mapped_writer import MappedSafetensorsWriter, PreallocationUnsupported
from .io.staged_writer import DirectIOUnsupported, StagedSafetensorsWriter, memory_holds
from .io.writer import CkptWriter, SafetensorsWriter, remove_leftovers
from .plan import Job, Plan
from .precision import rounding
from .steps import Step

CHUNK_ELEMENTS = 1 << 18  # float64 scratch per input: 2 MiB, stays in cache-friendly sizes
# How far ahead of the key being computed its inputs are asked for (bytes of output, about the same).
PREFETCH_BYTES = 64 << 20  # measured on a cold SD1.5 bake: 13.0 s against 14.3 s with the next key only
# A baked key's rows are cut in this many pieces per thread, taken in turn: a thread slowed by the
# writer's threads takes fewer, and none waits long for the others.
PIECES_PER_BAKE_THREAD = 4


@dataclass(frozen=True)
class Progress:
    """Reported after each key: how far the merge is, and anything worth telling the user."""

    keys_done: int
    keys_total: int
    bytes_done: int
    bytes_total: int
    key: str
    note: str = ""


@dataclass
class MergeResult:
    path: Path
    sha256: str
    recipe: dict | None
    timings: dict[str, float]
    name: str = ""
    config: Path | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class InPlaceResult:
    """A merge copied into existing tensors (a loaded model): what it was, and how to name it."""

    name: str  # the file name the same merge would get, without its extension
    recipe: dict  # the recipe as merged (inputs' sha256 filled in where known)
    recipe_hash: str  # short hash of that recipe, to trace an image back to it
    missing: list[str]  # merged keys the target has no tensor for
    timings: dict[str, float]
    notes: list[str] = field(default_factory=list)


ProgressFn = Callable[[Progress], None]
StopFn = Callable[[], bool]


def run(
    plan: Plan, device: str, *, progress: ProgressFn | None = None, should_stop: StopFn | None = None
) -> tuple[str, list[str]]:
    """Write the plan's output; returns its sha256 and notes (e.g. tensors moved to the CPU)."""
    plan.check()
    compute = _Compute(plan, usable_device(device))  # a bad device is refused before a temp file exists
    inputs = sum(_file_size(source.checkpoint.path) for source in plan.sources.values())
    fits = memory_holds(inputs + plan.output_bytes)
    for source in plan.sources.values():
        # Making an input's pages costs more CPU than finding them later saves (io/direct_reads.py):
        # only an input the page cache holds already is read through it, and only where all fit.
        if not fits or not source.reader.in_page_cache():
            source.reader.read_past_cache()
    return _loop(plan, compute, _open_writer(plan, fits), progress, should_stop)


def run_into(
    plan: Plan,
    device: str,
    target: Mapping[str, torch.Tensor],
    *,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> tuple[list[str], list[str]]:
    """Copy each merged tensor into ``target[key]`` in place, writing no file.

    ``target`` maps keys to existing tensors (a module's ``state_dict()`` shares their storage); each
    takes the merged values in its own dtype and device, as loading the merged file into it would:
    each tensor is rounded to the output's dtype first (the request's ``dtype``: bf16, fp8 ...), then
    cast to the target's.
    Returns the merged keys ``target`` lacks, and notes. After an error or a cancel some tensors hold
    merged values and others do not: the caller reloads what it had.
    """
    plan.check(ignore_output=True)
    into = _IntoMapping(target)
    _, notes = _loop(plan, _Compute(plan, usable_device(device)), into, progress, should_stop)
    return into.missing, notes


def _loop(plan: Plan, compute: _Compute, sink, progress: ProgressFn | None, should_stop: StopFn | None):
    """The one per-key loop: prefetch the next key, compute this one, hand it to the sink."""
    buffers = _BufferPool(max((job.spec.nbytes for job in plan.jobs), default=0))
    slot = getattr(sink, "slot", None)  # a sink that lets tensors be computed in their final place
    total_bytes = sum(job.spec.nbytes for job in plan.jobs)
    done_bytes = 0
    ahead = _Prefetcher(plan)
    try:
        for index, job in enumerate(plan.jobs):
            if should_stop is not None and should_stop():
                raise CancelledError("cancelled: the merge was stopped and nothing was written")
            ahead.past(index)
            tensor, release = compute.output(job, buffers, slot(job.key) if slot is not None else None)
            sink.add(job.key, tensor, release)
            done_bytes += job.spec.nbytes
            if progress is not None:
                progress(Progress(index + 1, len(plan.jobs), done_bytes, total_bytes, job.key, compute.pop_note()))
        return sink.finish(), compute.notes
    except BaseException:
        sink.abort()
        raise
    finally:
        compute.close()


class _TorchThreads:
    """Torch's CPU thread count, key by key, given back as it was when the merge ends.

    Elementwise keys are bound by memory and disk: there the arithmetic leaves a core each to
    hashing and to making the output's pages, or torch's workers would spin on the cores those
    need (measured on 2 cores: about 3 CPU-seconds more per SD1.5 merge, and slower). Whole-tensor
    methods (TIES, SLERP ...) are bound by the arithmetic, and keep every thread. LoRA bakes split
    each key's rows among threads of their own instead (``_Compute._bake``).
    """

    def __init__(self):
        self.original = self._current = torch.get_num_threads()
        self.streaming = max(1, min(self.original, _cpu_count() - 2))

    def use(self, count: int) -> None:
        if count != self._current:
            torch.set_num_threads(count)
            self._current = count

    def restore(self) -> None:
        self.use(self.original)


def _cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class _IntoMapping:
    """A sink like the writers', that copies each tensor into an existing one instead of a file."""

    def __init__(self, target: Mapping[str, torch.Tensor]):
        self.target = target
        self.missing: list[str] = []

    def add(self, key: str, tensor: torch.Tensor, release: Callable[[], None] | None = None) -> None:
        try:
            existing = self.target.get(key)
            if existing is None:
                self.missing.append(key)
            elif existing.shape != tensor.shape:
                raise IncompatibleModelsError(
                    f"{key}: the loaded model has shape {list(existing.shape)}, the merge {list(tensor.shape)}"
                )
            else:
                existing.copy_(tensor)
        finally:
            if release is not None:
                release()

    def finish(self) -> None:
        return None

    def abort(self) -> None:
        return None


def usable_device(name: str) -> torch.device:
    """The device, or a RequestError naming it when this machine cannot compute there."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RequestError(f"device: unknown device {name!r} (auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RequestError(f"device: {name} was asked for, but this machine has no usable CUDA GPU")
    mps = getattr(torch.backends, "mps", None)
    if device.type == "mps" and not (mps is not None and mps.is_available()):
        raise RequestError(f"device: {name} was asked for, but MPS is not available here")
    return device


def _open_writer(plan: Plan, fits: bool):
    """The output's writer; ``fits``: the inputs and the output fit in the memory available."""
    specs = [(job.key, job.spec) for job in plan.jobs]
    overwrite = plan.request.overwrite
    # Temp files of merges killed earlier (kill -9, a crash) would hold their full size forever.
    remove_leftovers(plan.output.parent)
    if plan.output.suffix.lower() != ".safetensors":
        return CkptWriter(plan.output, specs, overwrite=overwrite)
    # Where they fit: past the page cache where the OS and the filesystem can write so, else into
    # a mapped file. Where they do not: from staging buffers through the page cache (see
    # staged_writer.py). Without fallocate: streamed.
    if fits:
        writers = (StagedSafetensorsWriter, MappedSafetensorsWriter)
    else:
        writers = (partial(StagedSafetensorsWriter, past_cache=False),)
    for writer in writers:
        try:
            return writer(plan.output, specs, plan.metadata or None, overwrite=overwrite)
        except (DirectIOUnsupported, PreallocationUnsupported):
            pass
    return SafetensorsWriter(plan.output, specs, plan.metadata or None, overwrite=overwrite)


def _file_size(path: Path) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


class _Prefetcher:
    """Asks the kernel for the keys after the current one, up to ``PREFETCH_BYTES`` of them (the
    next key at least): the disk keeps reading while a key is computed, however small the next."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.requested = 0  # jobs before this index have been asked for
        self.bytes_ahead = 0

    def past(self, index: int) -> None:
        """Job ``index`` is computed now: keep the window ahead of it full."""
        jobs = self.plan.jobs
        if self.requested > index:
            self.bytes_ahead -= jobs[index].spec.nbytes
        self.requested = max(self.requested, index + 1)
        while self.requested < len(jobs) and (self.requested == index + 1 or self.bytes_ahead < PREFETCH_BYTES):
            _prefetch(self.plan, jobs[self.requested])
            self.bytes_ahead += jobs[self.requested].spec.nbytes
            self.requested += 1


def _prefetch(plan: Plan, job: Job) -> None:
    """Ask the kernel to start reading the next key's input pages now."""
    if job.kind == "vae":
        plan.vae.prefetch(_vae_key(job.key))
        return
    for role in dict.fromkeys(job.step.roles()) if job.step else ("A",):
        plan.reader(role).prefetch(job.key)


def _vae_key(key: str) -> str:
    return key[len("first_stage_model.") :]


def _row_pieces(rows: int, parts: int) -> list[tuple[int, int]]:
    """``rows`` cut into at most ``parts`` (start, stop) ranges of nearly equal size."""
    parts = max(1, min(parts, rows))
    bounds = [rows * index // parts for index in range(parts + 1)]
    return list(pairwise(bounds))


class _BufferPool:
    """Reusable output buffers: fresh pages for every tensor would cost more than the arithmetic."""

    def __init__(self, nbytes: int, budget: int = 384 << 20):
        self._nbytes = nbytes
        self._free: queue.Queue = queue.Queue()
        self._made = 0
        # Enough buffers to ride out a slow write, within a fixed memory budget (3 at least).
        self._count = max(3, min(8, budget // max(nbytes, 1)))

    def take(self, spec) -> tuple[torch.Tensor, Callable[[], None]]:
        if self._free.empty() and self._made < self._count:
            self._free.put(torch.empty(self._nbytes, dtype=torch.uint8))
            self._made += 1
        raw = self._free.get()
        tensor = raw[: spec.nbytes].view(spec.dtype).view(spec.shape)
        return tensor, lambda: self._free.put(raw)


class _Compute:
    """Computes each output tensor; falls back to the CPU when the device runs out of memory."""

    def __init__(self, plan: Plan, device: torch.device):
        self.plan = plan
        self.device = device
        self.threads = _TorchThreads()
        self.round_into = rounding(plan.request.dtype)  # result -> output tensor: the one rounding
        self.notes: list[str] = []
        self._note = ""
        self._scratch: list[tuple[torch.Tensor, torch.Tensor]] = []  # (float32, float64) per input
        self._bake_buffer = torch.empty(0, dtype=torch.uint8)  # grows to the largest key baked
        self._bake_pool: ThreadPoolExecutor | None = None
        self._fp8_tables = Fp8Tables(self.round_into, self._call, helpers=self.threads.original - 1)

    def close(self) -> None:
        self.threads.restore()
        self._fp8_tables.close()
        if self._bake_pool is not None:
            self._bake_pool.shutdown()

    def pop_note(self) -> str:
        note, self._note = self._note, ""
        return note

    def output(
        self, job: Job, buffers: _BufferPool, slot: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Callable[[], None] | None]:
        """The tensor to write for ``job`` (computed into ``slot`` when the sink offers its place),
        and what to call once it is written."""
        if job.kind != "merge":
            source = self._source(job)
            if source.dtype == job.spec.dtype:
                return source, None  # a view of the input's pages: the sink copies it as it is
        out, release = (slot, None) if slot is not None else buffers.take(job.spec)
        if job.kind != "merge":
            self.round_into(out, source)  # the built-in's to_half, or the request's dtype: one rounding
        else:
            self._merge(job, out)
        return out, release

    def _source(self, job: Job) -> torch.Tensor:
        if job.kind == "vae":
            return self.plan.vae[_vae_key(job.key)]
        return self.plan.reader("A")[job.key]

    def _merge(self, job: Job, out: torch.Tensor) -> None:
        if self.device.type != "cpu":
            try:
                return self._on_device(job, out)
            except torch.OutOfMemoryError:
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                self._note = f"{job.key}: out of {self.device.type} memory, computed on the CPU"
                self.notes.append(self._note)
        changes, base = self._added_changes(job.step)
        if changes and isinstance(base.args[0], str) and job.spec.shape and not base.method.float32:
            self._bake(job.key, self.plan.reader(base.args[0])[job.key], changes, out)
        elif job.step.flat:
            self.threads.use(self.threads.streaming)
            self._chunked(job, out)
        else:
            self.threads.use(self.threads.original)
            self.round_into(out, self._evaluate(job.step, job.key, torch.device("cpu")))

    def _bake(self, key: str, source: torch.Tensor, changes: list, out: torch.Tensor) -> None:
        """LoRAs baked into a stored tensor on the CPU, its rows cut in pieces that torch's thread count
        of threads take in turn: each copies a piece's rows to float64, adds the changes there and
        rounds them into ``out``.

        Not torch's own workers: between the small-rank products they spin on the cores that make
        and hash the output's pages (measured on 2 cores, SD1.5 and 3 LoRAs: as fast, and 18.4
        CPU-seconds against 20.4). The float64 copy lives in one reused buffer: fresh pages for
        every key cost more than the copy (4.0 s against 1.1 s for SD1.5's weights)."""
        nbytes = source.numel() * torch.float64.itemsize
        if self._bake_buffer.numel() < nbytes:
            self._bake_buffer = torch.empty(0, dtype=torch.uint8)  # the old one goes before the larger is made
            self._bake_buffer = torch.empty(nbytes, dtype=torch.uint8)
        work = self._bake_buffer[:nbytes].view(torch.float64).view(source.shape)
        reader = changes[0][0]
        threads = self.threads.original
        pieces = deque(_row_pieces(source.shape[0], threads * PIECES_PER_BAKE_THREAD))
        if len(pieces) == 1 or threads == 1 or not reader.splits_by_rows(key, changes):
            self.threads.use(threads)  # LoHa, LoKr ...: torch's workers on the whole change
            reader.add_changes(key, work.copy_(source), changes)
            return self.round_into(out, work)
        # The factors once per key (converted, scaled, side by side): each piece only multiplies.
        factors = reader.plain_factors(key, changes, work.device, work.dtype)

        def bake_rows(rows: tuple[int, int]) -> None:
            value = work[rows[0] : rows[1]].copy_(source[rows[0] : rows[1]])
            reader.add_factors(value, factors, window=rows)
            self.round_into(out[rows[0] : rows[1]], value)

        def take_pieces() -> None:  # until none is left (deque.popleft is atomic)
            while True:
                try:
                    rows = pieces.popleft()
                except IndexError:
                    return
                bake_rows(rows)

        self.threads.use(1)
        if self._bake_pool is None:
            # Torch's thread count is per thread for its BLAS: a new thread's products would
            # otherwise run on every core (measured: 2 cores busy), beside the other bake threads.
            self._bake_pool = ThreadPoolExecutor(
                threads - 1, thread_name_prefix="merge-lab-bake", initializer=torch.set_num_threads, initargs=(1,)
            )
        helpers = [self._bake_pool.submit(take_pieces) for _ in range(threads - 1)]
        take_pieces()
        for helper in helpers:
            helper.result()

    def _on_device(self, job: Job, out: torch.Tensor) -> None:
        self.round_into(out, self._evaluate(job.step, job.key, self.device))

    def _evaluate(self, step: Step, key: str, device: torch.device) -> torch.Tensor:
        """The step on whole tensors: fresh copies of the inputs in the work dtype (or the stored
        tensors, for methods that read them as stored), nested steps first."""
        dtype = self._work_dtype(step, device)
        changes, base = self._added_changes(step)
        if changes:  # a + alpha * delta (+ ...), the deltas' readers adding into a's fresh copy
            value = self._value(base.args[0], base, key, device, dtype)
            changes[0][0].add_changes(key, value, changes)
            return value
        args = [None if arg is None else self._value(arg, step, key, device, dtype) for arg in step.args]
        if step.variant:
            # Inpainting / pix2pix: the primary's extra input channels are kept, the first 4 merged.
            whole = args[0].to(dtype, copy=True) if step.method.stored_inputs else args[0]
            channels = next(arg.shape[1] for arg in args[1:] if arg is not None)
            args[0] = whole[:, :channels]
            whole[:, :channels] = self._call(step, args, key)
            return whole
        return self._call(step, args, key)

    def _added_changes(self, step: Step) -> tuple[list, Step]:
        """For ``adds_delta`` steps (LoRAs baked one after another) whose deltas' readers add their
        changes in place (see ``Method.adds_delta``): the (reader, alpha) pairs, innermost first, and
        the innermost such step, whose ``a`` they all go into; ([], step) for any other step."""
        changes, current, base = [], step, step
        while (
            current.method.adds_delta
            and not current.variant
            and isinstance(current.args[1], str)
            and hasattr(self.plan.reader(current.args[1]), "add_changes")
        ):
            changes.insert(0, (self.plan.reader(current.args[1]), current.params["alpha"]))
            base = current
            if not isinstance(current.args[0], Step):
                break
            current = current.args[0]
        return changes, base

    def _value(self, arg: str | Step, step: Step, key: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if isinstance(arg, Step):
            value = self._evaluate(arg, key, device)
            return value if step.method.stored_inputs else value.to(dtype)
        tensor = self.plan.reader(arg)[key]
        if step.method.stored_inputs:
            return tensor.to(device)  # on the CPU the input's own pages: read, never written
        return torch.empty(tensor.shape, dtype=dtype, device=device).copy_(tensor)

    def _work_dtype(self, step: Step, device: torch.device) -> torch.dtype:
        return torch.float32 if step.method.float32 or device.type == "mps" else torch.float64

    @staticmethod
    def _call(step: Step, args: list, key: str) -> torch.Tensor:
        extra = {"key": key} if step.method.keyed else {}
        return step.method.func(*args, **step.params, **extra)

    def _chunked(self, job: Job, out: torch.Tensor) -> None:
        """Slice by slice through float64 scratch, so no full-size float copy is ever made."""
        flat_in = [None if role is None else self.plan.reader(role)[job.key].reshape(-1) for role in job.step.args]
        flat_out = out.view(-1)
        if self._fp8_tables.apply(job.step, job.key, flat_in, flat_out, CHUNK_ELEMENTS):
            return
        total = flat_out.numel()
        step = min(CHUNK_ELEMENTS, max(total, 1))
        for start in range(0, total, step):
            stop = min(start + step, total)
            args = [
                None if tensor is None else self._widen(tensor[start:stop], index)
                for index, tensor in enumerate(flat_in)
            ]
            self.round_into(flat_out[start:stop], self._call(job.step, args, job.key))

    def _widen(self, piece: torch.Tensor, index: int) -> torch.Tensor:
        """An exact float64 copy of ``piece`` in scratch owned by input ``index``.

        16-bit floats go through float32 first: both steps are exact, and torch's direct
        half -> double conversion is not vectorised (about 4x slower on the CPU).
        """
        while len(self._scratch) <= index:
            self._scratch.append((torch.empty(CHUNK_ELEMENTS), torch.empty(CHUNK_ELEMENTS, dtype=torch.float64)))
        narrow, wide = (buffer[: piece.numel()] for buffer in self._scratch[index])
        if piece.dtype in (torch.float16, torch.bfloat16):
            return wide.copy_(narrow.copy_(piece))
        return wide.copy_(piece)
