"""``python -m lib_merge bench``: this engine against the I/O floor and a load-everything merge.

Inputs are synthetic checkpoints with the real keys and shapes of SD1.5 or SDXL (fp16, random
values), made once in ``--work``. Each contender runs in its own fresh interpreter, one after the
other per repeat, after one untimed warm-up each (page cache warm, input hashes cached as the
webui caches them). Reported: median wall time, its ratio to the floor, and the peak anonymous
memory (RssAnon, sampled; mapped file pages do not count) above an interpreter with torch imported.

Scenarios (``--scenarios``): ``builtin``, the built-in's methods (``--method``) against the floor
and the load-everything baseline; ``soup``, a uniform soup of 4 models; ``ties``, TIES over 3 task
vectors (base + 3 models, density 0.2, lambda 1). The last two are recipe trees merged by the
engine, each against its own floor (4 inputs read, 1 output written), with targets printed beside
the figures (not enforced: the exit status does not depend on them).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

CONTENDERS = ("floor", "engine", "baseline")
SAMPLE_SECONDS = 0.002
ROLES = "abcd"  # input files {tag}_{role}.safetensors, made with seeds 1, 2, 3, 4


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


def add_arguments(parser) -> None:
    from .methods import METHODS

    parser.add_argument("--arch", choices=("sd15", "sdxl"), default="sd15")
    parser.add_argument(
        "--method",
        default="weighted-sum",
        choices=[m.cli_name for m in METHODS.values() if len(m.inputs) > 1],
    )
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument(
        "--device", default="auto", help="the engine's device (the baseline is the CPU's, as in the webui)"
    )
    parser.add_argument("--repeats", type=int, default=3)
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
        "soup: 4 models; ties: base + 3 models); default: all for sd15, builtin for sdxl",
    )
    parser.set_defaults(run=run)


def _scenario_list(text: str) -> tuple[str, ...]:
    import argparse

    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(SCENARIOS)}, got {text!r}")
    return names


def run(args) -> int:
    args.work.mkdir(parents=True, exist_ok=True)
    scenarios = args.scenarios or (SCENARIOS if args.arch == "sd15" else ("builtin",))
    if "builtin" in scenarios:
        _run_builtin(args)
    tree_scenarios = [TREE_SCENARIOS[name] for name in scenarios if name in TREE_SCENARIOS]
    if tree_scenarios:
        _run_trees(args, tree_scenarios)
    return 0


def _inputs(args, count: int) -> list[str]:
    """The first ``count`` synthetic inputs (seeds 1, 2, ...), made once in ``--work``."""
    from . import synthetic

    specs = synthetic.layout(args.arch)
    tag = args.arch
    if args.max_dim:
        specs, tag = synthetic.scaled(specs, args.max_dim), f"{args.arch}_max{args.max_dim}"
    inputs = []
    for seed, role in enumerate(ROLES[:count], start=1):
        path = args.work / f"{tag}_{role}.safetensors"
        if not path.exists():
            print(f"making {path} ...", flush=True)
            synthetic.write_checkpoint(path, specs, seed)
        inputs.append(str(path))
    return inputs


def _job(args, inputs: list[str], **what) -> dict:
    return {
        "inputs": inputs,
        "device": args.device,
        "work": str(args.work),
        "fsync": not args.no_fsync,
        **what,
    }


def _run_builtin(args) -> None:
    from .methods import get_method

    method = get_method(args.method)
    job = _job(args, _inputs(args, len(method.inputs)), method=method.label, alpha=args.alpha)
    times: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    memory: dict[str, list[int]] = {name: [] for name in CONTENDERS}
    for repeat in range(args.repeats + 1):  # the first round warms caches and is not counted
        for name in CONTENDERS:
            result = _spawn(name, job)
            if repeat:
                times[name].append(result["seconds"])
                memory[name].append(result["peak_anon"])
    _print_table(args, method.label, times, memory)


def _run_trees(args, scenarios: list[Scenario]) -> None:
    """Each scenario: its own floor and the engine on its recipe tree, warm-up round first."""
    inputs = _inputs(args, max(s.models for s in scenarios))
    rows = []
    for scenario in scenarios:
        used = inputs[: scenario.models]
        job = _job(args, used, tree=scenario.tree(used))
        times: dict[str, list[float]] = {"floor": [], "engine": []}
        memory: list[int] = []
        phases: dict[str, list[float]] = {}
        for repeat in range(args.repeats + 1):  # the first round warms caches and is not counted
            for name in times:
                result = _spawn(name, job)
                if repeat:
                    times[name].append(result["seconds"])
                    if name == "engine":
                        memory.append(result["peak_anon"])
                        for phase, seconds in result.get("timings", {}).items():
                            phases.setdefault(phase, []).append(seconds)
        rows.append((scenario, times, memory, phases))
    _print_tree_table(args, rows)


def _print_table(args, method: str, times, memory) -> None:
    floor = statistics.median(times["floor"])
    print(
        f"\n{args.arch} {method} alpha={args.alpha} to fp16, device {args.device}, "
        f"{args.repeats} repeats, fsync {'off' if args.no_fsync else 'on'}, {os.cpu_count()} CPUs"
    )
    print(f"{'contender':<10} {'median s':>9} {'x floor':>8} {'peak anon MB':>13}")
    for name in CONTENDERS:
        median = statistics.median(times[name])
        print(f"{name:<10} {median:9.2f} {median / floor:8.2f} {max(memory[name]) / 2**20:13.0f}")


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


def _spawn(name: str, job: dict) -> dict:
    code = f"from lib_merge.bench import child; child({name!r}, {json.dumps(job)!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"bench {name} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def child(name: str, job_json: str) -> None:
    """Run one contender in this fresh interpreter and print its time and memory as JSON."""
    import torch  # noqa: F401  (the memory baseline is an interpreter with torch imported)

    job = json.loads(job_json)
    if not job["fsync"]:
        # Nothing is forced to disk: no fsync, and no early writeback (it only exists for the fsync).
        from .io import writer

        os.fsync = lambda fd: None
        writer.start_writeback = lambda fd, offset, length: None
    output = Path(job["work"]) / f"bench_{name}.safetensors"
    output.unlink(missing_ok=True)
    sampler = _AnonSampler()
    start = time.perf_counter()
    extra = {"floor": _floor, "engine": _engine, "baseline": _baseline}[name](job, output)
    seconds = time.perf_counter() - start
    peak = sampler.stop()
    output.unlink(missing_ok=True)
    print(json.dumps({"seconds": seconds, "peak_anon": peak, **(extra or {})}))


def _floor(job: dict, output: Path) -> None:
    """Read every input byte, write as many bytes as the engine's output, fsync."""
    block = bytearray(16 << 20)
    view = memoryview(block)
    for path in job["inputs"]:
        with open(path, "rb", buffering=0) as file:
            while file.readinto(view):
                pass
    size = _engine_output_size(job)
    with open(output, "wb", buffering=0) as file:
        while size:
            size -= file.write(view[: min(len(view), size)])
        os.fsync(file.fileno())


def _engine_output_size(job: dict) -> int:
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
    return MergeRequest(
        *names,
        interp_method=job["method"],
        multiplier=job["alpha"],
        save_as_half=True,
        overwrite=True,
        output_path=str(output),
        device=job["device"],
    )


def _cache(job: dict) -> Path:
    return Path(job["work"]) / "hashes.json"


def _baseline(job: dict, output: Path) -> None:
    """The built-in's algorithm (modules/extras.py): load whole, merge in place, save."""
    import safetensors.torch
    import torch

    alpha = job["alpha"]
    theta_1 = safetensors.torch.load_file(job["inputs"][1])
    if len(job["inputs"]) > 2:
        theta_2 = safetensors.torch.load_file(job["inputs"][2])
        for key in theta_1:
            if "model" in key:
                theta_1[key] = theta_1[key] - theta_2[key] if key in theta_2 else torch.zeros_like(theta_1[key])
        del theta_2
    theta_0 = safetensors.torch.load_file(job["inputs"][0])
    skip = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    for key in theta_0:
        if "model" in key and key in theta_1 and key != skip:
            a, b = theta_0[key], theta_1[key]
            merged = a + alpha * b if len(job["inputs"]) > 2 else (1 - alpha) * a + alpha * b
            theta_0[key] = merged.half() if merged.dtype == torch.float32 else merged
    del theta_1
    safetensors.torch.save_file(theta_0, str(output))
    fd = os.open(output, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


class _AnonSampler:
    """Peak RssAnon of this process above its value at start, sampled every few milliseconds."""

    def __init__(self):
        self._base = _rss_anon()
        self._peak = self._base
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
        return self._peak - self._base


def _rss_anon() -> int:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
