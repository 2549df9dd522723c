"""``python -m lib_merge bench --lora``: LoRA extraction and baking, against kohya's sd-scripts.

Cases: ``extract``, a LoRA of ``--rank`` (64) from a base checkpoint and a tuned one (the base plus a
small random change to every weight, text encoder included, so both tools extract it); ``bake``, 3
kohya LoRAs (``--lora-rank``, 32, every layer kohya's LoRA reaches: attention, resnets, samplers and
text encoders) baked into the base at ratios 0.8, 0.6, 0.4, to fp16. The base is the merge bench's
input (``{arch}_a``, kept); the tuned checkpoint and the LoRAs are made beside it and deleted after
their arch's cases unless ``--keep-inputs``; every output is deleted as soon as its run ends.

Contenders, each in its own process, timed and watched by ``bench.py`` (``_time_contenders``):
``floor`` (read the inputs, write as many bytes as the engine's output, fsync), ``engine`` (this
package's ``extract_lora`` / ``bake``), ``kohya`` (with ``--kohya``: sd-scripts'
``networks/extract_lora_from_models.py``, ``merge_lora.py`` or ``sdxl_merge_lora.py``, unchanged, run
by ``--kohya-python`` with the Hugging Face hub offline, its output fsynced like the others'). Times
start after torch is imported; memory is the peak RSS and the peak anonymous memory above an
interpreter with torch imported. The page cache is cold by default: every input is evicted before
every run. Targets (printed, not enforced): a bake within 1.3x the floor; an extraction faster than
kohya's with at most 1 GB of extra anonymous memory.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import bench
from .errors import RequestError

LORA_ARCHES = ("sd15", "sdxl")
CASES = ("extract", "bake")
DEFAULT_CASES = {"sd15": ("extract", "bake"), "sdxl": ("bake",)}
BAKE_RATIOS = (0.8, 0.6, 0.4)
TUNED_CHANGE = 0.05  # the tuned checkpoint: base + this x standard normal noise (kohya's min_diff is 0.01)
UP_SCALE = 0.01  # a random LoRA's up factors, so that its change is small beside the weights
KOHYA_SCRIPTS = {
    "extract": "networks/extract_lora_from_models.py",
    ("bake", "sd15"): "networks/merge_lora.py",
    ("bake", "sdxl"): "networks/sdxl_merge_lora.py",
}
BAKE_MAX_FLOOR_RATIO = 1.3
EXTRACT_MAX_EXTRA_ANON = int(1e9)

# Run by --kohya-python: kohya's script, unchanged, as ``python SCRIPT ARGS`` would (its folder and
# sd-scripts' root on sys.path), with the hub offline; timed from after torch's import like ours.
# Prints "base <RssAnon>" first for bench.run_guarded's memory watch, a JSON line last.
KOHYA_RUN = """
import json, os, runpy, sys, time
for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(name, "1")
import torch

def status(field):
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0

root, script, output, fsync, *argv = sys.argv[1:]
print("base", status("RssAnon"), flush=True)
sys.path[:0] = [os.path.dirname(os.path.join(root, script)), root]
sys.argv = [os.path.join(root, script), *argv]
start, cpu = time.perf_counter(), time.process_time()
runpy.run_path(sys.argv[0], run_name="__main__")
if fsync == "fsync":
    fd = os.open(output, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
os.unlink(output)
print(json.dumps({"seconds": seconds, "cpu": cpu, "peak_rss": status("VmHWM")}), flush=True)
"""


@dataclass(frozen=True)
class LoraCase:
    """One LoRA job to time: ``extract`` or ``bake`` on one arch."""

    arch: str
    kind: str
    rank: int  # extract: the LoRA's rank; bake: the rank of the LoRAs baked

    @property
    def name(self) -> str:
        return f"{self.arch} {self.kind}"

    def describe(self) -> str:
        model = bench.ARCH_TEXT[self.arch]
        if self.kind == "extract":
            return f"extract a rank-{self.rank} LoRA from two {model}s (base, tuned), to fp16"
        ratios = ", ".join(f"{r:g}" for r in BAKE_RATIOS)
        return f"bake {len(BAKE_RATIOS)} rank-{self.rank} LoRAs at {ratios} into an {model}, to fp16"


def add_arguments(parser) -> None:
    """The LoRA bench's options (``bench.add_arguments`` calls this)."""
    parser.add_argument(
        "--lora",
        action="store_true",
        help="the LoRA bench: extraction and baking against the floor and, with --kohya, kohya's sd-scripts; "
        f"--arch a comma list of {', '.join(LORA_ARCHES)} (default both)",
    )
    parser.add_argument(
        "--lora-cases",
        type=lambda text: bench._choice_list(text, CASES),
        default=None,
        help="with --lora: comma list of extract, bake; default extract,bake for sd15 and bake for sdxl",
    )
    parser.add_argument("--rank", type=int, default=64, help="with --lora: the rank extracted (default 64)")
    parser.add_argument("--lora-rank", type=int, default=32, help="with --lora: the rank of the LoRAs baked")
    parser.add_argument("--kohya", type=Path, default=None, help="with --lora: kohya's sd-scripts folder")
    parser.add_argument(
        "--kohya-python",
        default=sys.executable,
        help="with --lora: the python that runs kohya's scripts (torch, diffusers, transformers, accelerate, "
        "and sd-scripts' toml, imagesize, voluptuous); default this one",
    )


def run(args) -> int:
    """Each arch's cases, a table after each; the LoRA inputs deleted per arch unless kept."""
    arches = args.arch or LORA_ARCHES
    unknown = [name for name in arches if name not in LORA_ARCHES]
    if unknown:
        raise RequestError(f"--arch: the LoRA bench takes {', '.join(LORA_ARCHES)}, got {', '.join(unknown)}")
    if args.kohya is not None and not (args.kohya / KOHYA_SCRIPTS["extract"]).is_file():
        raise RequestError(f"--kohya: {args.kohya} has no {KOHYA_SCRIPTS['extract']}: not kohya's sd-scripts")
    _defaults(args)
    args.work.mkdir(parents=True, exist_ok=True)
    disk = bench._DiskSampler(args.work)
    try:
        for name in arches:
            _run_arch(argparse.Namespace(**{**vars(args), "arch": name, "input_dtype": bench.INPUT_DTYPES[name]}))
    finally:
        peak = disk.stop()
    print(f"\ndisk: the bench's files in {args.work} took {peak / 1e9:.2f} GB at most")
    return 0


def _defaults(args) -> None:
    args.repeats = 1 if args.repeats is None else args.repeats
    args.cache = args.cache or "cold"
    if args.memory_limit is None:
        available = min(bench.MEMORY_LIMIT_CAP, bench._mem_available() - bench.MEMORY_RESERVE)
        args.memory_limit = max(bench.MEMORY_LIMIT_FLOOR, available) / 1e9
    names = [name for name in ("floor", "engine") if name in args.contenders]
    args.lora_contenders = (*names, "kohya") if args.kohya is not None else tuple(names)


def _run_arch(args) -> None:
    made: list[Path] = []  # this arch's tuned checkpoint and LoRAs
    try:
        base = bench._inputs(args, 1, [])[0]
        for kind in args.lora_cases or DEFAULT_CASES[args.arch]:
            case = LoraCase(args.arch, kind, args.rank if kind == "extract" else args.lora_rank)
            job = _extract_job(args, base, made) if kind == "extract" else _bake_job(args, base, made)
            print(f"timing {args.arch} {kind}: {', '.join(args.lora_contenders)} ...", file=sys.stderr, flush=True)
            results = bench._time_contenders(args, job, args.lora_contenders)
            print_table(args, case, results)
    finally:
        if not args.keep_inputs:
            for path in made:
                path.unlink(missing_ok=True)


def _host(args):
    from . import FolderHost

    return FolderHost(args.work, hash_cache=args.work / "hashes.json", allow_paths=True)


def _extract_job(args, base: str, made: list[Path]) -> dict:
    from .lora.kohya import layer_modules, module_specs, rank_for

    specs, tag = bench._specs(args)
    tuned = args.work / f"{tag}_tuned.safetensors"
    _made(args, tuned, made, lambda: write_tuned(Path(base), tuned, specs, seed=2))
    modules = layer_modules(specs, lambda key: specs[key].shape, _family(args.arch), conv=False, text_encoder=True)
    size = sum(
        spec.nbytes
        for module in modules
        for _, spec in module_specs(module.name, module.shape, rank_for(module.shape, args.rank, None), _fp16())
    )
    job = bench._job(args, [base, str(tuned)], lora="extract", rank=args.rank, output_bytes=size)
    kohya = ["--model_org", base, "--model_tuned", str(tuned), "--dim", str(args.rank)]
    kohya += ["--device", _kohya_device(args), "--save_precision", "fp16"]
    return _with_kohya(args, job, KOHYA_SCRIPTS["extract"], [*kohya, *(["--sdxl"] if args.arch == "sdxl" else [])])


def _bake_job(args, base: str, made: list[Path]) -> dict:
    specs, tag = bench._specs(args)
    loras = []
    for seed, _ in enumerate(BAKE_RATIOS, start=11):
        path = args.work / f"{tag}_lora{seed - 10}_r{args.lora_rank}.safetensors"
        _made(
            args,
            path,
            made,
            lambda path=path, seed=seed: write_random_lora(path, specs, args.arch, args.lora_rank, seed),
        )
        loras.append(str(path))
    job = bench._job(args, [base, *loras], lora="bake", ratios=list(BAKE_RATIOS))
    job["output_bytes"] = _bake_output_bytes(job)
    kohya = ["--sd_model", base, "--models", *loras, "--ratios", *map(str, BAKE_RATIOS), "--save_precision", "fp16"]
    return _with_kohya(args, job, KOHYA_SCRIPTS["bake", args.arch], kohya)


def _made(args, path: Path, made: list[Path], write) -> None:
    """Make ``path`` with ``write()`` (returning its sha256) unless a kept one is there; its hash cached."""
    if path not in made:
        made.append(path)
    if path.exists():
        return
    print(f"making {path} ...", end=" ", flush=True)
    start = time.perf_counter()
    _host(args).register(path, write())
    print(f"{path.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - start:.1f} s", flush=True)


def _with_kohya(args, job: dict, script: str, argv: list[str]) -> dict:
    """The job with kohya's command line (``bench._spawn`` runs it in place of a child); its output
    is ``bench_kohya.safetensors`` in --work, the name ``_spawn`` deletes if the run fails."""
    if args.kohya is None:
        return job
    output = str(Path(args.work) / "bench_kohya.safetensors")
    fsync = "fsync" if job["fsync"] else "no-fsync"
    command = [args.kohya_python, "-c", KOHYA_RUN, str(args.kohya), script, output, fsync, *argv, "--save_to", output]
    return {**job, "commands": {"kohya": command}}


def _kohya_device(args) -> str:
    """kohya's --device: the engine's, resolved (auto is the CPU on a machine without a GPU)."""
    from .hosts import default_device

    return default_device() if args.device in ("", "auto") else args.device


def _family(name: str) -> str:
    from . import arch

    return {"sd15": arch.SD1, "sdxl": arch.SDXL}[name]


def _fp16():
    import torch

    return torch.float16


def _bake_request(job: dict, output: Path):
    from . import arch
    from .lora import LoraRef, bake_request

    loras = [LoraRef(name, ratio) for name, ratio in zip(job["inputs"][1:], job["ratios"], strict=True)]
    return bake_request(
        job["inputs"][0],
        loras,
        family=arch.UNKNOWN,
        output_path=str(output),
        overwrite=True,
        device=job["device"],
    )


def _bake_output_bytes(job: dict) -> int:
    """The bake's output size, from its preflight (headers only), for the floor to write."""
    from . import FolderHost
    from .lora import plan_bake

    host = FolderHost(job["work"], hash_cache=bench._cache(job), allow_paths=True)
    plan = plan_bake(_bake_request(job, Path(job["work"]) / "size.safetensors"), host, hash_inputs=False)
    try:
        return plan.output_bytes
    finally:
        plan.close()


def engine(job: dict, output: Path) -> dict:
    """The engine contender of a LoRA job (run by ``bench.child`` in a fresh interpreter)."""
    from . import FolderHost
    from .lora import bake, extract_lora

    host = FolderHost(job["work"], device=job["device"], hash_cache=bench._cache(job), allow_paths=True)
    if job["lora"] == "extract":
        base, tuned = job["inputs"]
        extract_lora(
            base,
            tuned,
            output,
            rank=job["rank"],
            dtype="fp16",
            device=job["device"],
            overwrite=True,
            hash_base=lambda path: host.sha256(host.resolve(str(path))),
        )
        return {}
    return {"timings": bake(_bake_request(job, output), host).timings}


def write_tuned(base: Path, path: Path, specs: dict, seed: int) -> str:
    """The tuned checkpoint: each float weight of ``base`` plus ``TUNED_CHANGE`` x standard normal
    noise (seeded), streamed key by key; returns its sha256."""
    from . import synthetic
    from .io.formats import open_checkpoint
    from .io.writer import SafetensorsWriter

    writer = SafetensorsWriter(path, list(specs.items()), None, overwrite=True)
    try:
        with open_checkpoint(base) as reader:
            for key, noise in synthetic.random_tensors(specs, seed):
                weight = reader[key]
                if weight.dtype.is_floating_point:
                    weight = (weight.float() + TUNED_CHANGE * noise.float()).to(weight.dtype)
                writer.add(key, weight)
        return writer.finish()
    except BaseException:
        writer.abort()
        raise


def write_random_lora(path: Path, specs: dict, arch_name: str, rank: int, seed: int) -> str:
    """A kohya LoRA of ``rank`` with a module for every layer kohya's LoRA has in a checkpoint of
    these specs (attention, resnets and samplers at the same rank, text encoders), random factors
    (seeded); returns its sha256."""
    from . import synthetic
    from .lora.kohya import Factors, layer_modules, module_specs, network_metadata, rank_for, write_lora

    family = _family(arch_name)
    modules = layer_modules(specs, lambda key: specs[key].shape, family, conv=True, text_encoder=True)
    lora_specs = [
        spec
        for module in modules
        for spec in module_specs(module.name, module.shape, rank_for(module.shape, rank, rank), _fp16())
    ]
    values = synthetic.random_tensors({key: spec for key, spec in lora_specs if not key.endswith(".alpha")}, seed)

    def factors():
        for module in modules:
            (_, down), (_, up) = next(values), next(values)  # module_specs' order: down, up, alpha
            yield Factors(module.name, up * UP_SCALE, down)

    metadata = network_metadata(family, rank, rank, path.stem)
    return write_lora(path, lora_specs, metadata, factors(), overwrite=True)


def targets(case: LoraCase, results: dict[str, list[dict]]) -> tuple[str, str]:
    """(the target, whether the engine met it: "yes", "no (...)" or "-" when a figure is missing)."""
    engine = bench._median(results.get("engine", []))
    if engine is None:
        return "", "-"
    if case.kind == "bake":
        floor = bench._median(results.get("floor", []))
        text = f"engine <= {BAKE_MAX_FLOOR_RATIO:g}x the floor"
        if floor is None:
            return text, "-"
        ratio = engine / floor
        return text, f"yes ({ratio:.2f}x)" if ratio <= BAKE_MAX_FLOOR_RATIO else f"no ({ratio:.2f}x)"
    text = f"engine faster than kohya, extra anonymous memory <= {EXTRACT_MAX_EXTRA_ANON / 1e9:g} GB"
    kohya = bench._median(results.get("kohya", []))
    anon = max(r["peak_anon"] for r in results["engine"] if not r.get("failed"))
    missed = [] if anon <= EXTRACT_MAX_EXTRA_ANON else [f"memory {anon / 1e9:.2f} GB"]
    if kohya is None:
        return text, f"no ({', '.join(missed)})" if missed else "- (no kohya time)"
    if engine >= kohya:
        missed.insert(0, f"time {engine / kohya:.2f}x kohya's")
    return text, f"no ({', '.join(missed)})" if missed else f"yes ({kohya / engine:.1f}x faster)"


def print_table(args, case: LoraCase, results: dict[str, list[dict]]) -> None:
    print(
        f"\n{args.arch} {case.kind}: {case.describe()}; device {args.device}, {args.repeats} repeat(s), "
        f"{args.cache} page cache, fsync {'off' if args.no_fsync else 'on'}, {os.cpu_count()} CPUs"
    )
    floor = bench._median(results.get("floor", []))
    print(
        f"{'contender':<10} {'seconds':>8} {'x floor':>8} {'cpu s':>7} {'load':>5} {'peak RSS GB':>12} {'extra anon GB':>14}"
    )
    for name, runs in results.items():
        median = bench._median(runs)
        if median is None:
            print(f"{name:<10} {bench._failed_text(runs[0])}")
            continue
        rss = max(r.get("peak_rss", 0) for r in runs)
        anon = max(r["peak_anon"] for r in runs)
        print(
            f"{name:<10} {median:8.2f} {bench._ratio(median, floor):>8} {bench._median(runs, 'cpu'):7.1f} "
            f"{bench._median(runs, 'load'):5.1f} {rss / 1e9:12.2f} {anon / 1e9:14.2f}"
        )
    text, met = targets(case, results)
    if text:
        print(f"target: {text}: {met}", flush=True)
    bench._print_phases([(case, results, "")])  # a bake's engine phases
