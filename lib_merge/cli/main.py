"""The command line: argparse -> MergeRequest -> engine. The only module that prints for the CLI."""

from __future__ import annotations

import argparse
import glob
import json
import signal
import sys
import traceback
from collections import Counter
from pathlib import Path

from .. import arch, precision
from ..engine import Progress
from ..errors import MergeError, RequestError, brief
from ..hosts import FolderHost
from ..io.formats import open_checkpoint
from ..io.metadata import BUILTIN_METHODS
from ..methods import get_method, listed_methods
from ..recipe import MergeNode, ModelRef, dump_recipe
from ..request import MergeRequest
from . import lora, recipes

CONFIG_CHOICES = {"abc": 0, "b": 1, "c": 2, "none": 3}
EXIT_FAILED, EXIT_INTERNAL, EXIT_CANCELLED = 1, 3, 130


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.progress = TerminalProgress() if sys.stderr.isatty() else None
    signal.signal(signal.SIGTERM, _interrupt)  # a kill cleans up like Ctrl-C: no temp file left
    try:
        return args.run(args)
    except MergeError as err:
        _close(args.progress)
        print(f"merge-lab: error: {err}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        _close(args.progress)
        print("merge-lab: cancelled; nothing was written", file=sys.stderr)
        return EXIT_CANCELLED
    except Exception as err:  # the edge: a short message, the traceback only on request
        _close(args.progress)
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"merge-lab: internal error: {brief(err)} (--debug shows more)", file=sys.stderr)
        return EXIT_INTERNAL


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="merge-lab", description="Streaming Stable Diffusion checkpoint merger.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    merge = commands.add_parser("merge", help="merge checkpoints into a new file")
    merge.add_argument(
        "models", nargs="+", metavar="MODEL", help="the method's inputs in order (a quoted glob expands)"
    )
    merge.add_argument(
        "--method",
        default="weighted-sum",
        type=method_name,
        choices=[m.cli_name for m in listed_methods()],
        help="the merge method, spelled as here, as in recipes (task_arithmetic) or as in the tab (Weighted sum)",
    )
    merge.add_argument("--alpha", type=float, help="the multiplier M (default: the method's own)")
    merge.add_argument("--base", help="the base model of task-vector methods (task-arithmetic, ties, dare ...)")
    merge.add_argument(
        "--set", action="append", default=[], metavar="PARAM=VALUE", help="a method parameter (repeatable)"
    )
    merge.add_argument(
        "--blocks",
        action="append",
        default=[],
        metavar="PARAM=LIST",
        help="a parameter per block: values in block order (SD1: BASE,IN00..IN11,M00,OUT00..OUT11; SDXL: IN00..IN08, "
        "M00, OUT00..OUT08; Flux: BASE,D00..D18,S00..S37; SD3: BASE,J00..), IN04=0.3,OUT*=0.7 overrides, or a preset",
    )
    merge.add_argument("-o", "--output", required=True, type=Path, help="output file: .safetensors or .ckpt")
    merge.add_argument("--half", action="store_true", help="save float32 results as float16 (the built-in's)")
    merge.add_argument(
        "--dtype",
        default="",
        choices=precision.CHOICES,
        help="output precision of every float tensor: keep (the primary's), fp32, fp16, bf16, fp8_e4m3fn or "
        "fp8_e5m2 (saturating); rounded once to nearest (default: the inputs' type, as the built-in)",
    )
    merge.add_argument("--vae", help="VAE file to bake in")
    merge.add_argument("--discard", default="", metavar="REGEX", help="drop keys matching this regex")
    merge.add_argument("--no-metadata", action="store_true", help="write no metadata")
    merge.add_argument("--metadata-json", default="{}", help="extra metadata fields, a JSON object")
    merge.add_argument(
        "--config-source",
        choices=list(CONFIG_CHOICES),
        default="abc",
        help="copy the .yaml config of: the first of A/B/C having one, B, C, or none",
    )
    merge.add_argument("--overwrite", action="store_true", help="replace an existing output (never an input)")
    merge.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    merge.add_argument("--dry-run", action="store_true", help="print the preflight report, write nothing")
    merge.set_defaults(run=run_merge)

    inspect = commands.add_parser("inspect", help="architecture, dtypes, size and merge recipe of a checkpoint")
    inspect.add_argument("file", type=Path)
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.set_defaults(run=run_inspect)

    recipes.add_commands(commands, run_request)
    lora.add_commands(commands)

    bench = commands.add_parser("bench", help="time this engine against the I/O floor and a load-everything merge")
    from ..bench import add_arguments

    add_arguments(bench)

    demo = commands.add_parser("demo", help="make two checkpoints with real SD1.5 key names and merge them")
    demo.add_argument("--dir", type=Path, default=Path("demo"))
    demo.add_argument("--full-size", action="store_true", help="real SD1.5 shapes (2.1 GB per file)")
    demo.set_defaults(run=run_demo)
    return parser


def method_name(text: str) -> str:
    """A method in any spelling the project uses (recipe ``task_arithmetic``, CLI ``task-arithmetic``,
    tab label ``Task arithmetic``), as the CLI spells it."""
    try:
        return get_method(text.strip()).cli_name
    except RequestError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("interp_method: ")) from None


def request_from_args(args) -> MergeRequest:
    method = get_method(args.method)
    models = _expand_globs(args.models)
    if args.base:
        if method.inputs[0] != "base":
            raise RequestError(
                f"--base: method {method.cli_name} has no base input (its inputs: {method.inputs_text()})"
            )
        models = [args.base, *models]
    params = dict(_pairs(args.set, "--set"))
    if args.alpha is not None:
        if method.params and "alpha" not in method.params:
            raise RequestError(
                f"--alpha: method {method.cli_name} has no alpha; use --set ({', '.join(method.params)})"
            )
        params["alpha"] = args.alpha
    block_texts = dict(_pairs(args.blocks, "--blocks"))
    options = {
        "save_as_half": args.half,
        "dtype": args.dtype,
        "checkpoint_format": "ckpt" if args.output.suffix.lower() in (".ckpt", ".pt") else "safetensors",
        "config_source": CONFIG_CHOICES[args.config_source],
        "bake_in_vae": args.vae or "None",
        "discard_weights": args.discard,
        "save_metadata": not args.no_metadata,
        "metadata_json": args.metadata_json,
        "overwrite": args.overwrite,
        "device": args.device,
        "output_path": str(args.output),
    }
    builtin = method.name in BUILTIN_METHODS and not block_texts and set(params) <= {"alpha"} and len(models) <= 3
    if builtin:
        if len(models) > len(method.inputs):
            method.check_input_count(len(models))
        alpha = params.get("alpha", method.params["alpha"].default if "alpha" in method.params else 0.0)
        names = [*models, "", ""][:3]
        return MergeRequest(*names, interp_method=method.label, multiplier=alpha, **options)
    tree = MergeNode(method.name, tuple(ModelRef(m) for m in models), params, block_texts)
    return MergeRequest(models[0], tree=tree, **options)


def _pairs(items: list[str], option: str) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise RequestError(f"{option}: expected NAME=VALUE, got {item!r}")
        pairs.append((name.strip(), value.strip()))
    return pairs


def _expand_globs(models: list[str]) -> list[str]:
    """A quoted pattern like 'run/step-*.safetensors' becomes its files, in name order."""
    expanded = []
    for model in models:
        if glob.has_magic(model) and not Path(model).exists():
            matches = sorted(glob.glob(model))
            if not matches:
                raise RequestError(f"{model}: no file matches this pattern")
            expanded += matches
        else:
            expanded.append(model)
    return expanded


def run_merge(args) -> int:
    request = request_from_args(args)
    # The paths on the command line are the user's own: they may name files anywhere.
    folder = args.output.parent if str(args.output.parent) else Path(".")
    host = FolderHost(folder, device=args.device, allow_paths=True)
    return run_request(request, host, args)


def run_request(request: MergeRequest, host: FolderHost, args) -> int:
    """Merge (or with --dry-run only preflight) and print the output path and its sha256."""
    from .. import make_plan, merge

    if args.dry_run:
        plan = make_plan(request, host)
        try:
            print(plan.report())
            return 0 if plan.ok else EXIT_FAILED
        finally:
            plan.close()
    result = merge(request, host, progress=args.progress)
    _close(args.progress)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(result.path)
    print(f"sha256 {result.sha256}")
    return 0


def inspect_report(path: Path) -> dict:
    with open_checkpoint(path) as reader:
        keys = reader.keys()
        dtypes = Counter(str(reader.spec(k).dtype).replace("torch.", "") for k in keys)
        metadata = dict(reader.metadata)
        report = {
            "file": str(path),
            "architecture": arch.describe_reader(reader),
            "keys": len(keys),
            "parameters": sum(reader.spec(k).numel for k in keys),
            "dtypes": dict(dtypes.most_common()),
            "bytes": reader.nbytes,
        }
    for field in ("sd_merge_recipe", "sd_merge_models"):
        if field in metadata:
            try:
                report[field] = json.loads(metadata.pop(field))
            except json.JSONDecodeError:
                report[field] = metadata.get(field)
    report["metadata"] = metadata
    return report


def run_inspect(args) -> int:
    report = inspect_report(args.file)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"File: {report['file']}")
    print(f"Architecture: {report['architecture']}")
    print(f"Keys: {report['keys']}, parameters: {report['parameters']:,}, {report['bytes'] / 1e9:.2f} GB")
    print("Dtypes: " + ", ".join(f"{name} ({count} keys)" for name, count in report["dtypes"].items()))
    if "sd_merge_recipe" in report:
        recipe = dict(report["sd_merge_recipe"]) if isinstance(report["sd_merge_recipe"], dict) else {}
        lab_recipe = recipe.pop("merge_lab_recipe", None)
        print("Merge recipe (sd_merge_recipe):")
        print(json.dumps(recipe or report["sd_merge_recipe"], indent=2))
        if lab_recipe:
            print("Merge Lab recipe (replay with: python -m lib_merge replay FILE -o NEW):")
            print(dump_recipe(lab_recipe).rstrip())
    else:
        print("Merge recipe: none in the metadata")
    if "sd_merge_models" in report:
        print("Merged from (sd_merge_models):")
        for sha, info in report["sd_merge_models"].items():
            print(f"  {sha}  {info.get('name') if isinstance(info, dict) else info}")
    for key, value in report["metadata"].items():
        print(f"Metadata {key}: {value if len(value) < 200 else value[:200] + '...'}")
    return 0


def run_demo(args) -> int:
    from .. import synthetic

    args.dir.mkdir(parents=True, exist_ok=True)
    specs = synthetic.layout("sd15")
    if not args.full_size:
        specs = synthetic.scaled(specs, max_dim=64)
    paths = []
    for name, seed in (("demo_a", 1), ("demo_b", 2)):
        path = args.dir / f"{name}.safetensors"
        synthetic.write_checkpoint(path, specs, seed)
        paths.append(path)
        print(f"made {path} ({len(specs)} SD1.5 keys)")
    output = args.dir / "demo_merged.safetensors"
    code = main(["merge", *map(str, paths), "--alpha", "0.5", "-o", str(output), "--overwrite"])
    if code == 0:
        print()
        main(["inspect", str(output)])
    return code


class TerminalProgress:
    """A one-line progress bar on stderr, for a terminal."""

    def __init__(self, stream=sys.stderr, width: int = 30):
        self.stream = stream
        self.width = width
        self.shown = False

    def __call__(self, event: Progress) -> None:
        self.shown = True
        filled = int(self.width * event.bytes_done / max(event.bytes_total, 1))
        self.stream.write(
            f"\r[{'#' * filled}{'.' * (self.width - filled)}] {event.keys_done}/{event.keys_total} keys "
            f"{event.bytes_done / 1e9:.2f}/{event.bytes_total / 1e9:.2f} GB"
        )
        if event.note:
            self.stream.write(f"\nnote: {event.note}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.shown = False


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _close(progress: TerminalProgress | None) -> None:
    if progress is not None:
        progress.close()
