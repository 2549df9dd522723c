"""``python -m lib_merge bench``: this engine against the I/O floor and a load-everything merge.

Inputs are synthetic checkpoints with the real keys and shapes of a model (``synthetic.py``: SD1.5
and SDXL checkpoints in fp16; the Flux dev and SD3.5 large transformers in fp8 e4m3fn, as users
download them to save memory), random values, made once in ``--work``. Each contender runs in its
own fresh interpreter, one after the other per repeat. Reported: median wall time, its ratio to the
floor, the contender's CPU seconds, the machine's load average during the run, and the peak
anonymous memory (RssAnon, sampled; mapped file pages do not count) above an interpreter with torch
imported.

Page cache: SD1.5 and SDXL fit in it, so one untimed warm-up round runs first (page cache warm,
input hashes cached as the webui caches them). Flux and SD3.5 do not (24-36 GB of inputs for 24 GB
of memory), so a warm-up would warm nothing: their runs start cold, every input evicted from the
page cache before each run (``posix_fadvise``), and the inputs' hashes are cached when they are made.

Cases: each ``--method`` (weighted sum 0.5, add difference 1.0) to each ``--dtype`` (the output
precision). The big models' disk use is planned: the cases that read fewer inputs run first (the
third input is made only then), each output is deleted as soon as its run ends, a case the free
space cannot hold (less ``--disk-reserve``, left to the machine's other users) is skipped and said
so, and the inputs are deleted at the end (``--keep-inputs`` keeps them). Each run is guarded: past
``--memory-limit`` of anonymous memory, or when the machine's available memory runs low, it is
stopped and reported as OOM, before the kernel's OOM killer would pick a process.

Scenarios (``--scenarios``): ``builtin``, the cases above against the floor and the baseline;
``soup``, a uniform soup of 4 models; ``ties``, TIES over 3 task vectors (base + 3 models, density
0.2, lambda 1). The last two are recipe trees merged by the engine, each against its own floor (4
inputs read, 1 output written). Targets are printed beside the figures (not enforced: the exit
status does not depend on them).

``--lora``: LoRA extraction and baking against the floor and kohya's sd-scripts (``bench_lora.py``),
timed, watched and evicted from the page cache by the same machinery.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

CONTENDERS = ("floor", "engine", "baseline")
SAMPLE_SECONDS = 0.01  # a run's own memory sampler: every 2 ms it took a fifth of a core from the engine
WATCH_SECONDS = 0.02  # the parent's look at a child's memory (at the machine's: every 5th look)
ROLES = "abcd"  # input files {tag}_{role}.safetensors, made with seeds 1, 2, 3, 4
BIG_ARCHES = ("flux", "sd35")  # inputs beyond the page cache: cold runs, disk plan, inputs deleted
INPUT_DTYPES = {"sd15": "fp16", "sdxl": "fp16", "flux": "fp8_e4m3fn", "sd35": "fp8_e4m3fn"}
ARCH_TEXT = {
    "sd15": "SD1.5 checkpoint",
    "sdxl": "SDXL checkpoint",
    "flux": "Flux dev transformer",
    "sd35": "SD3.5 large transformer",
}
# Defaults per arch: the methods and the output precisions (builtin: fp16 by save_as_half).
BIG_METHODS = ("weighted-sum", "add-difference")
BIG_DTYPES = ("fp8_e4m3fn", "bf16")
METHOD_ALPHA = {"weighted_sum": 0.5, "add_difference": 1.0}
# Targets for the big models (issue 19): the engine within 1.3x the floor and 1 GB of extra memory.
BIG_MAX_FLOOR_RATIO = 1.3
BIG_MAX_EXTRA_ANON = int(1e9)
MEMORY_LIMIT_CAP = 20e9  # the default limit: this, or what is available at the start less a reserve
MEMORY_RESERVE = 3e9  # left to everything else on the machine
MEMORY_LIMIT_FLOOR = 1e9  # the default limit never goes under this (the engine and the floor need far less)
LOW_MEMORY = 2e9  # a run is stopped when the machine has less than this available ...
LOW_MEMORY_SHARE = 0.5e9  # ... and the run holds more than this (stopping a small one would free nothing)
HEADER_ALLOWANCE = 1 << 20  # a safetensors header, at most (the disk plan's estimates)


@dataclass(frozen=True)
class Scenario:
    """A recipe tree over the first ``models`` inputs, and the targets it should meet on the CPU."""

    name: str
    method: str
    models: int
    params: dict
    max_floor_ratio: float
    max_extra_anon: int  # bytes

    def tree(self, inputs: list[str]) -> dict:
        from .recipe import MergeNode, ModelRef

        return MergeNode(self.method, tuple(ModelRef(p) for p in inputs), self.params).to_dict()

    def describe(self) -> str:
        params = "".join(f", {k} {v:g}" for k, v in self.params.items())
        if self.method == "soup":
            return f"uniform soup of {self.models} models{params}"
        from .methods import get_method

        label = get_method(self.method).label
        return f"{label} over {self.models - 1} task vectors (base + {self.models - 1}){params}"


TREE_SCENARIOS = {
    "soup": Scenario("soup", "soup", 4, {}, 1.3, int(1.5e9)),
    "ties": Scenario("ties", "ties", 4, {"density": 0.2, "lambda": 1.0}, 3.0, int(1.5e9)),
}
SCENARIOS = ("builtin", *TREE_SCENARIOS)


@dataclass(frozen=True)
class Case:
    """One built-in merge to time: a method, its multiplier and the output precision."""

    method: str  # the method's label, as the built-in's interp_method
    alpha: float
    dtype: str  # "" the built-in's precision (fp16 by save_as_half), else a precision.DTYPES name
    inputs: int
    output_bytes: int  # estimated from the specs (the floor writes the preflight's exact size)

    @property
    def name(self) -> str:
        return f"{self.method.lower()} {self.alpha} to {self.dtype or 'fp16'}"


@dataclass
class DiskPlan:
    """The order of the cases and the most disk the bench's files take at once."""

    order: list[Case]
    input_bytes: int  # one input
    peak: int  # the bench's own files at once: the inputs of a case and its output
    needed: int  # of that, the most not on disk yet
    unfit: list[Case] = field(default_factory=list)  # cases the free space cannot hold


def plan_disk(cases: list[Case], input_bytes: int, made: int, free: int, reserve: int = int(2e9)) -> DiskPlan:
    """Cases that read fewer inputs first (the next input is made only when needed); the peak is
    the inputs of a case plus its output. ``made``: inputs already on disk; ``free``: free bytes,
    of which ``reserve`` stays free."""
    order = sorted(cases, key=lambda case: case.inputs)
    peak = needed = 0
    unfit = []
    for case in order:
        new = max(0, case.inputs - made) * input_bytes + case.output_bytes
        if new + reserve > free:
            unfit.append(case)
            continue
        peak, needed = max(peak, case.inputs * input_bytes + case.output_bytes), max(needed, new)
    return DiskPlan(order, input_bytes, peak, needed, unfit)


def add_arguments(parser) -> None:
    from . import bench_lora, synthetic
    from .methods import listed_methods
    from .precision import CHOICES

    names = [m.cli_name for m in listed_methods() if len(m.inputs) > 1]
    parser.add_argument(
        "--arch",
        type=lambda text: _choice_list(text, synthetic.ARCHES),
        default=None,
        help="sd15 (default), sdxl: full checkpoints in fp16; flux: the Flux dev transformer (11.9 GB in fp8); "
        "sd35: the SD3.5 large transformer (8.1 GB in fp8); one at a time, except a comma list with --lora",
    )
    parser.add_argument(
        "--method",
        type=lambda text: _choice_list(text, names),
        default=None,
        help=f"comma list of {', '.join(names)}; default weighted-sum, and {','.join(BIG_METHODS)} for flux and sd35",
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="the multiplier of every method; default 0.5 for weighted sum, 1.0 for add difference",
    )
    parser.add_argument(
        "--dtype",
        type=lambda text: _choice_list(text, CHOICES),
        default=None,
        help=f"comma list of output precisions ({', '.join(CHOICES)}); default builtin (fp16 by save_as_half) "
        f"for sd15 and sdxl, {','.join(BIG_DTYPES)} for flux and sd35",
    )
    parser.add_argument(
        "--input-dtype",
        choices=("fp16", "bf16", "fp8_e4m3fn"),
        default=None,
        help="the inputs' dtype; default fp16 for sd15 and sdxl, fp8_e4m3fn for flux and sd35",
    )
    parser.add_argument(
        "--device", default="auto", help="the engine's device (the baseline is the CPU's, as in the webui)"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed runs of each contender; default 3, 1 for flux and sd35"
    )
    parser.add_argument(
        "--cache",
        choices=("warm", "cold"),
        default=None,
        help="warm: an untimed warm-up round first (default for sd15, sdxl); cold: the inputs are evicted "
        "from the page cache before every run, no warm-up (default for flux, sd35, whose inputs it cannot hold)",
    )
    parser.add_argument(
        "--contenders",
        type=lambda text: _choice_list(text, CONTENDERS),
        default=CONTENDERS,
        help=f"comma list of {', '.join(CONTENDERS)} (without the floor, no ratios)",
    )
    parser.add_argument(
        "--memory-limit",
        type=float,
        default=None,
        help="GB of anonymous memory past which a run is stopped and reported as OOM; default the smaller "
        f"of {MEMORY_LIMIT_CAP / 1e9:g} and the memory available at the start less {MEMORY_RESERVE / 1e9:g}",
    )
    parser.add_argument(
        "--disk-reserve",
        type=float,
        default=2.0,
        help="GB of the disk's free space the bench leaves to others: a case that would take it is skipped",
    )
    parser.add_argument(
        "--keep-inputs",
        action="store_true",
        help="keep the inputs in --work for the next run (sd15 and sdxl always do; flux and sd35 delete theirs)",
    )
    parser.add_argument("--work", type=Path, default=Path("bench-work"), help="folder for inputs and outputs")
    parser.add_argument(
        "--max-dim", type=int, default=0, help="cap every dimension (a quick smoke run, not a benchmark)"
    )
    parser.add_argument(
        "--no-fsync",
        action="store_true",
        help="force nothing to disk in all three: no fsync, no early writeback (warm page cache figures)",
    )
    parser.add_argument(
        "--scenarios",
        type=_scenario_list,
        default=None,
        help=f"comma list of {', '.join(SCENARIOS)} (builtin: --method vs the floor and the baseline; "
        "soup: 4 models; ties: base + 3 models); default: all for sd15, builtin for the others",
    )
    bench_lora.add_arguments(parser)
    parser.set_defaults(run=run)


def _choice_list(text: str, choices) -> tuple[str, ...]:
    import argparse

    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [name for name in names if name not in choices]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(choices)}, got {text!r}")
    return names


def _scenario_list(text: str) -> tuple[str, ...]:
    return _choice_list(text, SCENARIOS)


def _defaults(args) -> None:
    """Fill in the per-arch defaults of the options left unset."""
    big = args.arch in BIG_ARCHES
    args.method = args.method or (BIG_METHODS if big else ("weighted-sum",))
    args.dtype = args.dtype or (BIG_DTYPES if big else ("builtin",))
    args.input_dtype = args.input_dtype or INPUT_DTYPES[args.arch]
    if args.repeats is None:
        args.repeats = 1 if big else 3
    args.cache = args.cache or ("cold" if big else "warm")
    if args.memory_limit is None:
        available = min(MEMORY_LIMIT_CAP, _mem_available() - MEMORY_RESERVE)
        args.memory_limit = max(MEMORY_LIMIT_FLOOR, available) / 1e9
    args.keep_inputs = args.keep_inputs or not big
    args.targets = big


def run(args) -> int:
    if args.lora:
        from .bench_lora import run as run_lora

        return run_lora(args)
    if args.arch and len(args.arch) > 1:
        from .errors import RequestError

        raise RequestError("--arch: one at a time (a comma list only with --lora)")
    args.arch = args.arch[0] if args.arch else "sd15"
    _defaults(args)
    args.work.mkdir(parents=True, exist_ok=True)
    scenarios = args.scenarios or (SCENARIOS if args.arch == "sd15" else ("builtin",))
    disk = _DiskSampler(args.work)
    used: list[Path] = []  # the inputs this run read (made now or before), deleted at the end unless kept
    try:
        if "builtin" in scenarios:
            _run_builtin(args, used)
        tree_scenarios = [TREE_SCENARIOS[name] for name in scenarios if name in TREE_SCENARIOS]
        if tree_scenarios:
            _run_trees(args, tree_scenarios, used)
    finally:
        if not args.keep_inputs:
            for path in used:
                path.unlink(missing_ok=True)
        peak = disk.stop()
    print(f"\ndisk: the bench's files in {args.work} took {peak / 1e9:.2f} GB at most", end="")
    print(f" (its {len(used)} inputs deleted at the end)" if not args.keep_inputs else "")
    return 0


def _specs(args):
    """The inputs' keys and specs, and the tag of their file names."""
    from . import synthetic
    from .precision import DTYPES

    specs = synthetic.with_dtype(synthetic.layout(args.arch), DTYPES[args.input_dtype])
    # SD1.5 and SDXL inputs keep the names they always had (sd15_a.safetensors ...).
    plain = args.arch not in BIG_ARCHES and args.input_dtype == INPUT_DTYPES[args.arch]
    tag = args.arch if plain else f"{args.arch}_{args.input_dtype}"
    if args.max_dim:
        specs, tag = synthetic.scaled(specs, args.max_dim), f"{tag}_max{args.max_dim}"
    return specs, tag


def _input_paths(args, count: int) -> list[Path]:
    _, tag = _specs(args)
    return [args.work / f"{tag}_{role}.safetensors" for role in ROLES[:count]]


def _inputs(args, count: int, used: list[Path]) -> list[str]:
    """The first ``count`` synthetic inputs (seeds 1, 2, ...), made once in ``--work``, their
    sha256 in the bench's hash cache (as the webui's cache would hold it); added to ``used``."""
    from . import FolderHost, synthetic

    specs, _ = _specs(args)
    host = FolderHost(args.work, hash_cache=args.work / "hashes.json", allow_paths=True)
    inputs = []
    for seed, path in enumerate(_input_paths(args, count), start=1):
        if not path.exists():
            print(f"making {path} ...", end=" ", flush=True)
            start = time.perf_counter()
            sha256 = synthetic.write_checkpoint_hashed(path, specs, seed)
            host.register(path, sha256)
            print(f"{path.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - start:.1f} s", flush=True)
        else:
            host.sha256(host.resolve(str(path)))  # hashed once, if an earlier run left it unhashed
        inputs.append(str(path))
        if path not in used:
            used.append(path)
    return inputs


def _cases(args) -> list[Case]:
    import torch

    from .methods import get_method
    from .precision import DTYPES, check_choice

    specs, _ = _specs(args)
    cases = []
    for name in args.method:
        method = get_method(name)
        alpha = args.alpha if args.alpha is not None else METHOD_ALPHA.get(method.name, 0.5)
        for choice in args.dtype:
            dtype = check_choice(choice, False)
            out = DTYPES[dtype] if dtype not in ("", "keep") else None
            nbytes = HEADER_ALLOWANCE
            for spec in specs.values():
                kind = out if out is not None and spec.dtype.is_floating_point else spec.dtype
                if not dtype and spec.dtype == torch.float32:
                    kind = torch.float16  # save_as_half
                nbytes += prod(spec.shape) * kind.itemsize
            cases.append(Case(method.label, alpha, dtype, len(method.inputs), nbytes))
    return cases


def _job(args, inputs: list[str], **what) -> dict:
    return {
        "inputs": inputs,
        "device": args.device,
        "work": str(args.work),
        "fsync": not args.no_fsync,
        **what,
    }


def _run_builtin(args, used: list[Path]) -> None:
    cases = _cases(args)
    specs, _ = _specs(args)
    input_bytes = HEADER_ALLOWANCE + sum(spec.nbytes for spec in specs.values())
    present = sum(path.exists() for path in _input_paths(args, max(case.inputs for case in cases)))
    reserve = int(args.disk_reserve * 1e9)
    plan = plan_disk(cases, input_bytes, present, _free(args.work), reserve)
    big = args.arch in BIG_ARCHES
    if big:
        _print_disk_plan(args, plan, present)
    contenders = tuple(name for name in CONTENDERS if name in args.contenders)
    rows = []
    for case in plan.order:
        new = max(0, case.inputs - present) * plan.input_bytes + case.output_bytes
        if case in plan.unfit or new + reserve > _free(args.work):
            total = (case.inputs * plan.input_bytes + case.output_bytes) / 1e9
            free = (_free(args.work) + _present_bytes(args, present)) / 1e9
            reason = (
                f"skipped: its {case.inputs} inputs and output need {total:.1f} GB of disk, "
                f"{free:.1f} GB free with the inputs on disk, {args.disk_reserve:g} GB of it left to others"
            )
            rows.append((case, None, reason))
        else:
            inputs = _inputs(args, case.inputs, used)
            present = max(present, case.inputs)
            job = _job(args, inputs, method=case.method, alpha=case.alpha, dtype=case.dtype)
            job["output_bytes"] = _engine_output_size(job)
            rows.append((case, _time_contenders(args, job, contenders), ""))
        if big:
            _print_case(args, rows[-1], header=len(rows) == 1)  # as it goes: a flux case takes many minutes
    if big:
        _print_phases(rows)
        return
    for case, results, skipped in rows:
        if results is None:
            print(f"\n{args.arch} {case.name}: {skipped}")
        else:
            _print_table(args, case, results)


def _time_contenders(args, job: dict, contenders) -> dict[str, list[dict]]:
    """Each contender's results, ``args.repeats`` timed rounds (after a warm-up in a warm cache).
    A run stopped for memory, or failed, is not repeated: it would again."""
    results: dict[str, list[dict]] = {name: [] for name in contenders}
    warmup = args.cache == "warm"
    for repeat in range(args.repeats + warmup):
        for name in contenders:
            if any(result.get("failed") for result in results[name]):
                continue
            if args.cache == "cold":
                evict(job["inputs"])
            result = _spawn(name, job, limit=int(args.memory_limit * 1e9))
            if repeat or not warmup or result.get("failed"):
                results[name].append(result)
            if args.arch in BIG_ARCHES:
                what = _failed_text(result) if result.get("failed") else f"{result['seconds']:.1f} s"
                print(f"  [{time.strftime('%H:%M:%S')}] {name}: {what}", file=sys.stderr, flush=True)
    return results


def _run_trees(args, scenarios: list[Scenario], used: list[Path]) -> None:
    """Each scenario: its own floor and the engine on its recipe tree, warm-up round first."""
    inputs = _inputs(args, max(s.models for s in scenarios), used)
    rows = []
    for scenario in scenarios:
        job = _job(args, inputs[: scenario.models], tree=scenario.tree(inputs[: scenario.models]))
        job["output_bytes"] = _engine_output_size(job)
        times: dict[str, list[float]] = {"floor": [], "engine": []}
        memory: list[int] = []
        phases: dict[str, list[float]] = {}
        for repeat in range(args.repeats + 1):  # the first round warms caches and is not counted
            for name in times:
                result = _spawn(name, job, limit=int(args.memory_limit * 1e9))
                if result.get("failed"):
                    raise RuntimeError(f"bench {name} of {scenario.name}: {_failed_text(result)}")
                if repeat:
                    times[name].append(result["seconds"])
                    if name == "engine":
                        memory.append(result["peak_anon"])
                        for phase, seconds in result.get("timings", {}).items():
                            phases.setdefault(phase, []).append(seconds)
        rows.append((scenario, times, memory, phases))
    _print_tree_table(args, rows)


def _print_disk_plan(args, plan: DiskPlan, present: int) -> None:
    biggest = max((case.output_bytes for case in plan.order), default=0)
    inputs = max((case.inputs for case in plan.order), default=0)
    full = inputs * plan.input_bytes + biggest
    print(
        f"disk plan: {inputs} inputs of {plan.input_bytes / 1e9:.2f} GB ({present} on disk already), outputs up to "
        f"{biggest / 1e9:.2f} GB, each deleted after its run; order: " + ", ".join(case.name for case in plan.order)
    )
    print(
        f"  the bench needs {full / 1e9:.1f} GB at most (a 64 GB disk {'holds' if full < 64e9 else 'cannot hold'} it); "
        f"{_free(args.work) / 1e9:.1f} GB free in {args.work} now besides the inputs on disk, "
        f"{args.disk_reserve:g} GB of it left to others"
        + (
            "; too big for that: " + ", ".join(case.name for case in plan.unfit)
            if plan.unfit
            else f"; peak here {plan.peak / 1e9:.1f} GB"
        ),
        flush=True,
    )


def _present_bytes(args, count: int) -> int:
    return sum(path.stat().st_size for path in _input_paths(args, count) if path.exists())


def _free(path: Path) -> int:
    return shutil.disk_usage(path).free


def _median(results: list[dict], what: str = "seconds") -> float | None:
    values = [result[what] for result in results if not result.get("failed")]
    return statistics.median(values) if values else None


def _ratio(median: float, floor: float | None) -> str:
    return "-" if floor is None else f"{median / floor:.2f}"


def _failed_text(result: dict) -> str:
    if result.get("oom"):
        return (
            f"OOM: stopped at {result['peak_anon'] / 1e9:.1f} GB of extra anonymous memory ({result['why']}) "
            f"after {result['seconds']:.0f} s"
        )
    return f"failed after {result['seconds']:.0f} s: {result['failed']}"


def _print_table(args, case: Case, results) -> None:
    floor = _median(results.get("floor", []))
    print(
        f"\n{args.arch} {case.method} alpha={case.alpha:g} to {case.dtype or 'fp16'}, device {args.device}, "
        f"{args.repeats} repeats, fsync {'off' if args.no_fsync else 'on'}, {os.cpu_count()} CPUs"
    )
    print(f"{'contender':<10} {'median s':>9} {'x floor':>8} {'peak anon MB':>13} {'cpu s':>7} {'load':>5}")
    for name, runs in results.items():
        median = _median(runs)
        if median is None:
            print(f"{name:<10} {_failed_text(runs[0])}")
            continue
        print(
            f"{name:<10} {median:9.2f} {_ratio(median, floor):>8} {max(r['peak_anon'] for r in runs) / 2**20:13.0f} "
            f"{_median(runs, 'cpu'):7.1f} {_median(runs, 'load'):5.1f}"
        )


def _print_case(args, row, header: bool) -> None:
    case, results, skipped = row
    if header:
        specs, _ = _specs(args)
        params = sum(prod(spec.shape) for spec in specs.values())
        print(
            f"\n{args.arch}: {ARCH_TEXT[args.arch]} ({len(specs)} tensors, {params / 1e9:.2f} G parameters), "
            f"inputs {args.input_dtype}, device {args.device}, {args.repeats} repeat(s), {args.cache} page cache"
            f"{' (inputs evicted before every run)' if args.cache == 'cold' else ''}, fsync "
            f"{'off' if args.no_fsync else 'on'}, {os.cpu_count()} CPUs, memory limit {args.memory_limit:.1f} GB"
        )
        print(
            f"targets: engine <= {BIG_MAX_FLOOR_RATIO:g}x floor, "
            f"extra anonymous memory <= {BIG_MAX_EXTRA_ANON / 1e9:g} GB"
        )
        print(
            f"{'case':<32} {'contender':<9} {'median s':>9} {'x floor':>8} {'cpu s':>7} {'load':>5} "
            f"{'extra anon GB':>14}  met"
        )
    if results is None:
        print(f"{case.name:<32} {skipped}", flush=True)
        return
    floor = _median(results.get("floor", []))
    for name, runs in results.items():
        median = _median(runs)
        if median is None:
            print(f"{case.name:<32} {name:<9} {_failed_text(runs[0])}", flush=True)
            continue
        anon = max(r["peak_anon"] for r in runs)
        met = ""
        if name == "engine" and args.targets:
            fast = floor is not None and median / floor <= BIG_MAX_FLOOR_RATIO
            checks = (("time", fast), ("memory", anon <= BIG_MAX_EXTRA_ANON))
            missed = [what for what, ok in checks if not ok]
            met = f"no ({', '.join(missed)})" if missed else "yes"
        cpu, load = _median(runs, "cpu"), _median(runs, "load")
        print(
            f"{case.name:<32} {name:<9} {median:9.2f} {_ratio(median, floor):>8} {cpu:7.1f} {load:5.1f} "
            f"{anon / 1e9:14.2f}  {met}",
            flush=True,
        )


def _print_phases(rows) -> None:
    """The engine's phases (median s) per case, after the table."""
    for case, results, _ in rows:
        if results and _median(results.get("engine", [])) is not None:
            phases: dict[str, list[float]] = {}
            for result in results["engine"]:
                for phase, seconds in result.get("timings", {}).items():
                    phases.setdefault(phase, []).append(seconds)
            text = ", ".join(f"{phase} {statistics.median(values):.2f}" for phase, values in phases.items())
            if text:  # an extraction reports no phases
                print(f"  {case.name} engine phases (median s): {text}")


def _print_tree_table(args, rows) -> None:
    print(
        f"\n{args.arch} recipe trees by the engine to fp16, each against its own floor (its inputs read, "
        f"1 output written), device {args.device}, {args.repeats} repeats, "
        f"fsync {'off' if args.no_fsync else 'on'}, {os.cpu_count()} CPUs (the targets are for the CPU)"
    )
    for scenario, _, _, _ in rows:
        print(f"  {scenario.name}: {scenario.describe()}, {scenario.models} inputs")
    print(
        f"{'scenario':<9} {'floor s':>8} {'engine s':>9} {'x floor':>8} {'target':>7} "
        f"{'extra anon GB':>14} {'target':>7}  met"
    )
    for scenario, times, memory, _ in rows:
        floor = statistics.median(times["floor"])
        engine = statistics.median(times["engine"])
        ratio = engine / floor
        anon = max(memory)
        missed = [
            what
            for what, ok in (("time", ratio <= scenario.max_floor_ratio), ("memory", anon <= scenario.max_extra_anon))
            if not ok
        ]
        met = f"no ({', '.join(missed)})" if missed else "yes"
        print(
            f"{scenario.name:<9} {floor:8.2f} {engine:9.2f} {ratio:8.2f} {'<=' + format(scenario.max_floor_ratio, 'g'):>7} "
            f"{anon / 1e9:14.2f} {'<=' + format(scenario.max_extra_anon / 1e9, 'g'):>7}  {met}"
        )
    for scenario, _, _, phases in rows:
        if phases:
            text = ", ".join(f"{phase} {statistics.median(values):.2f}" for phase, values in phases.items())
            print(f"  {scenario.name} engine phases (median s): {text}")


def evict(paths) -> None:
    """Drop these files' clean pages from the page cache, so the next run reads them from disk."""
    if not hasattr(os, "posix_fadvise"):
        return
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _spawn(name: str, job: dict, limit: int) -> dict:
    """Run one contender (``child`` in a fresh interpreter, or the job's own command for it)."""
    code = f"from lib_merge.bench import child; child({name!r}, {json.dumps(job)!r})"
    done = run_guarded(job.get("commands", {}).get(name) or [sys.executable, "-c", code], limit)
    if done["oom"] or done["returncode"]:
        # Stopped for memory, or an error: a line in the table (the error in full on stderr), not
        # the end of a benchmark that may have run for an hour.
        from .io.writer import remove_leftovers

        Path(job["work"], f"bench_{name}.safetensors").unlink(missing_ok=True)
        remove_leftovers(Path(job["work"]))  # a killed engine's temp file
        if not done["oom"]:
            print(f"bench {name} failed:\n{done['stderr']}", file=sys.stderr)
        lines = done["stderr"].strip().splitlines()
        done["failed"] = "out of memory" if done["oom"] else (lines[-1] if lines else f"exit {done['returncode']}")
        return done
    # A command that reports no memory of its own has the peak run_guarded saw.
    return {"peak_anon": done["peak_anon"], **json.loads(done["stdout"].strip().splitlines()[-1]), "load": done["load"]}


def run_guarded(command: list[str], limit: int) -> dict:
    """Run ``command``, watching its anonymous memory: past ``limit`` bytes above what it had when
    it said ``base <bytes>`` on stdout (0 if it never says), or when the machine's available memory
    falls under ``LOW_MEMORY`` while it holds over ``LOW_MEMORY_SHARE``, it is killed and reported
    as ``oom`` with the peak it reached and why. So a load-everything merge that cannot fit ends as
    a line in the table, never as the kernel's OOM killer choosing among the machine's processes."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out: list[str] = []
    err: list[str] = []
    base = [0]

    def read_out():
        for line in process.stdout:
            if line.startswith("base ") and not out:
                base[0] = int(line.split()[1])
            else:
                out.append(line)

    readers = [
        threading.Thread(target=read_out, daemon=True),
        threading.Thread(target=lambda: err.extend(process.stderr), daemon=True),
    ]
    for reader in readers:
        reader.start()
    peak, why, looks, loads = 0, "", 0, []
    while process.poll() is None:
        if looks % 50 == 0:  # about once a second
            loads.append(os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0)
        looks += 1
        anon = _rss_anon(process.pid) - base[0]
        peak = max(peak, anon)
        if anon > limit:
            why = f"past the limit of {limit / 1e9:.1f} GB"
        elif anon > LOW_MEMORY_SHARE and looks % 5 == 0 and _mem_available() < LOW_MEMORY:
            why = f"the machine had under {LOW_MEMORY / 1e9:g} GB available"
        if why:
            process.send_signal(signal.SIGKILL)
            process.wait()
            break
        time.sleep(WATCH_SECONDS)
    seconds = time.perf_counter() - started
    for reader in readers:
        reader.join()
    return {
        "oom": bool(why),
        "why": why,
        "peak_anon": peak,
        "seconds": seconds,
        "load": statistics.mean(loads) if loads else 0.0,  # the machine's 1-minute load average
        "returncode": process.returncode,
        "stdout": "".join(out),
        "stderr": "".join(err),
    }


def child(name: str, job_json: str) -> None:
    """Run one contender in this fresh interpreter and print its time and memory as JSON."""
    import torch  # noqa: F401  (the memory baseline is an interpreter with torch imported)

    job = json.loads(job_json)
    if not job["fsync"]:
        # Nothing is forced to disk: no fsync, and no early writeback (it only exists for the fsync).
        from .io import staged_writer, writer

        os.fsync = lambda fd: None
        for module in (writer, staged_writer):
            module.start_writeback = lambda fd, offset, length: None
        staged_writer.write_out_and_drop = lambda fd, offset, length: None
    output = Path(job["work"]) / f"bench_{name}.safetensors"
    output.unlink(missing_ok=True)
    sampler = _AnonSampler()
    print(f"base {sampler.base}", flush=True)  # for the parent's memory guard
    start, cpu = time.perf_counter(), time.process_time()
    runs = {"floor": _floor, "engine": _engine, "baseline": _baseline}
    if job.get("lora"):  # extract or bake: the LoRA bench's engine
        from .bench_lora import engine

        runs["engine"] = engine
    extra = runs[name](job, output)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = sampler.stop()
    output.unlink(missing_ok=True)
    peak_rss = _rss_anon(field="VmHWM")
    print(json.dumps({"seconds": seconds, "cpu": cpu, "peak_anon": peak, "peak_rss": peak_rss, **(extra or {})}))


def _floor(job: dict, output: Path) -> None:
    """Read every input byte, write as many bytes as the engine's output, fsync."""
    block = bytearray(16 << 20)
    view = memoryview(block)
    for path in job["inputs"]:
        with open(path, "rb", buffering=0) as file:
            while file.readinto(view):
                pass
    size = job["output_bytes"]
    with open(output, "wb", buffering=0) as file:
        while size:
            size -= file.write(view[: min(len(view), size)])
        os.fsync(file.fileno())


def _engine_output_size(job: dict) -> int:
    """The engine's output size, from the preflight (headers only), for the floor to write."""
    from . import FolderHost, make_plan

    plan = make_plan(
        _request(job, Path(job["work"]) / "size.safetensors"),
        FolderHost(job["work"], hash_cache=_cache(job), allow_paths=True),
    )
    try:
        return plan.output_bytes
    finally:
        plan.close()


def _engine(job: dict, output: Path) -> dict:
    from . import FolderHost, merge

    result = merge(
        _request(job, output), FolderHost(job["work"], device=job["device"], hash_cache=_cache(job), allow_paths=True)
    )
    return {"timings": result.timings}


def _request(job: dict, output: Path):
    from .request import MergeRequest

    if job.get("tree"):
        from .recipe import node_from_dict

        tree = node_from_dict(job["tree"])
        return MergeRequest(
            next(tree.models()).name,
            tree=tree,
            save_as_half=True,
            overwrite=True,
            output_path=str(output),
            device=job["device"],
        )
    names = [*job["inputs"], "", ""][:3]
    dtype = job.get("dtype", "")
    return MergeRequest(
        *names,
        interp_method=job["method"],
        multiplier=job["alpha"],
        save_as_half=not dtype,
        dtype=dtype,
        overwrite=True,
        output_path=str(output),
        device=job["device"],
    )


def _cache(job: dict) -> Path:
    return Path(job["work"]) / "hashes.json"


def _baseline(job: dict, output: Path) -> None:
    """The built-in's algorithm (modules/extras.py): load whole, merge in place, save.

    With the built-in's precision exactly its arithmetic (in the inputs' dtype, float32 results
    saved as float16). With a chosen output precision, fp8 tensors are widened to float32 for the
    arithmetic (torch has none in fp8 on the CPU) and each result, B - C included, is stored in that
    precision, as the built-in stores it in the inputs' dtype.
    """
    import safetensors.torch
    import torch

    from .precision import DTYPES, FP8

    alpha = job["alpha"]
    out = DTYPES[job["dtype"]] if job.get("dtype") else None

    def wide(tensor):
        return tensor.float() if out is not None and tensor.dtype in FP8 else tensor

    def stored(tensor):
        if out is not None:
            return tensor.to(out) if tensor.dtype.is_floating_point else tensor
        return tensor.half() if tensor.dtype == torch.float32 else tensor

    theta_1 = safetensors.torch.load_file(job["inputs"][1])
    if len(job["inputs"]) > 2:
        theta_2 = safetensors.torch.load_file(job["inputs"][2])
        for key in theta_1:
            if "model" in key:
                if key in theta_2:
                    difference = wide(theta_1[key]) - wide(theta_2[key])
                    theta_1[key] = stored(difference) if out is not None else difference
                else:
                    theta_1[key] = torch.zeros_like(theta_1[key])
        del theta_2
    theta_0 = safetensors.torch.load_file(job["inputs"][0])
    skip = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    for key in theta_0:
        if "model" in key and key in theta_1 and key != skip:
            a, b = wide(theta_0[key]), wide(theta_1[key])
            merged = a + alpha * b if len(job["inputs"]) > 2 else (1 - alpha) * a + alpha * b
            theta_0[key] = stored(merged)
    del theta_1
    safetensors.torch.save_file(theta_0, str(output))
    fd = os.open(output, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


class _AnonSampler:
    """Peak RssAnon of this process above its value at start, sampled every few milliseconds."""

    def __init__(self):
        self.base = self._peak = _rss_anon()
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while self._running:
            self._peak = max(self._peak, _rss_anon())
            time.sleep(SAMPLE_SECONDS)

    def stop(self) -> int:
        self._running = False
        self._thread.join()
        self._peak = max(self._peak, _rss_anon())
        return self._peak - self.base


class _DiskSampler:
    """The most bytes the files in ``folder`` took at once (allocated blocks), sampled 4 times a second."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, folder_bytes(self.folder))
            if self._stop.wait(0.25):
                return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, folder_bytes(self.folder))


def folder_bytes(folder: Path) -> int:
    """Bytes allocated on disk to the files directly in ``folder`` (temp files included)."""
    total = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        try:
            if entry.is_file(follow_symlinks=False):
                total += entry.stat(follow_symlinks=False).st_blocks * 512
        except OSError:
            pass  # a file deleted while we looked
    return total


def _rss_anon(pid: int | str = "self", field: str = "RssAnon") -> int:
    """RssAnon (or another ``field`` in kB, VmHWM: the peak RSS) of a process, in bytes."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _mem_available() -> float:
    """MemAvailable in bytes (the machine's; infinite where /proc/meminfo is missing)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")
