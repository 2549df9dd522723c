"""The LoRA commands of the command line: ``lora bake CHECKPOINT LORA[:RATIO]... -o OUT``,
``lora extract BASE TUNED --rank N -o OUT`` and ``lora merge LORA[:RATIO]... -o OUT``."""

from __future__ import annotations

import sys
from pathlib import Path

from .. import arch, precision
from ..errors import InputError, RequestError
from ..hosts import Checkpoint, FolderHost
from ..io.formats import open_checkpoint

BLOCKS_HELP = (
    "per-block weights, multiplied by the LoRA's ratio (LoRA Block Weight's convention), in the block grammar of "
    "merges: a comma list (SD1: BASE,IN00..IN11,M00,OUT00..OUT11; SDXL: BASE,IN00..IN08,M00,OUT00..OUT08; Flux: "
    "BASE,D00..D18,S00..S37), a preset, or BLOCK=weight items (IN*=0,OUT05=0.5; blocks not named weigh 1). "
    "Given once it applies to every LoRA; given once per LoRA, the Nth applies to the Nth LoRA ('' for none)"
)


def add_commands(commands) -> None:
    """Register ``lora`` and its actions."""
    lora = commands.add_parser("lora", help="LoRA files: bake them into a checkpoint, extract one, merge them")
    actions = lora.add_subparsers(required=True, metavar="ACTION")
    bake = actions.add_parser(
        "bake",
        help="bake LoRAs into a checkpoint, exactly: float64, one rounding to the output dtype",
        description="Write CHECKPOINT + sum of ratio x change of each LoRA (kohya LoRA/LoCon, LyCORIS LoHa/LoKr, "
        "diffusers/PEFT) as a new file. Keys no LoRA patches are copied as they are; a LoRA for another "
        "architecture is refused before anything is written.",
    )
    bake.add_argument("checkpoint", type=Path, help="the checkpoint to bake into")
    bake.add_argument(
        "loras", nargs="+", metavar="LORA[:RATIO]", help="a LoRA file and its ratio (default 1; negative subtracts)"
    )
    bake.add_argument("-o", "--output", required=True, type=Path, help="output file: .safetensors or .ckpt")
    bake.add_argument("--blocks", action="append", default=[], metavar="WEIGHTS", help=BLOCKS_HELP)
    bake.add_argument(
        "--dtype",
        default="",
        choices=precision.CHOICES,
        help="output precision of every float tensor: keep, fp32, fp16, bf16, fp8_e4m3fn or fp8_e5m2, rounded once "
        "to nearest (default: the checkpoint's dtype at each key)",
    )
    bake.add_argument("--no-metadata", action="store_true", help="write no metadata")
    bake.add_argument("--overwrite", action="store_true", help="replace an existing output (never an input)")
    bake.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    bake.add_argument("--dry-run", action="store_true", help="print the preflight report, write nothing")
    bake.set_defaults(run=run_bake)
    add_extract(actions)
    add_merge(actions)


LORA_DTYPES = ("fp16", "bf16", "fp32")


def add_extract(actions) -> None:
    extract = actions.add_parser(
        "extract",
        help="extract a kohya LoRA from a base and a tuned checkpoint (SVD of their difference)",
        description="Write the LoRA that takes BASE towards TUNED, as kohya's extract_lora_from_models does: for each "
        "attention layer (and, with --conv-rank, each resnet and sampler conv) the difference cut to a rank by SVD, "
        "its factors clamped at a quantile, alpha = rank. SD1, SD2 and SDXL. The text encoder is left out when "
        "none of its weights differs by more than --min-diff.",
    )
    extract.add_argument("base", type=Path, help="the checkpoint the LoRA is applied to")
    extract.add_argument("tuned", type=Path, help="the checkpoint the LoRA should turn BASE into")
    extract.add_argument("-o", "--output", required=True, type=Path, help="output LoRA file (.safetensors)")
    extract.add_argument("--rank", required=True, metavar="N", help="rank of linear and 1x1 conv layers")
    extract.add_argument(
        "--conv-rank", metavar="N", help="rank of 3x3 convs; without it they are left out, as kohya does"
    )
    extract.add_argument(
        "--clamp-quantile",
        default="0.99",
        metavar="Q",
        help="clamp the factors at this quantile of their values, in (0, 1]; 1 clamps nothing (default 0.99)",
    )
    extract.add_argument(
        "--min-diff",
        default="0.01",
        metavar="D",
        help="the text encoder is extracted only if one of its weights differs by more than this (default 0.01)",
    )
    extract.add_argument("--no-text-encoder", action="store_true", help="extract the UNet only")
    extract.add_argument("--dtype", default="fp16", choices=LORA_DTYPES, help="precision of the factors (default fp16)")
    extract.add_argument("--device", default="auto", help="where the SVDs run: auto, cpu, cuda, cuda:N or mps")
    extract.add_argument("--overwrite", action="store_true", help="replace an existing output (never an input)")
    extract.set_defaults(run=run_extract)


def add_merge(actions) -> None:
    merge = actions.add_parser(
        "merge",
        help="merge LoRAs at ratios into one kohya LoRA: exactly (ranks concatenated) or re-ranked by SVD",
        description="Write one LoRA whose change is the sum of each LoRA's change times its ratio. Without --rank "
        "the ranks are concatenated, exactly (plain LoRA/LoCon only); with --rank each layer's summed change is cut "
        "to that rank by SVD (any kind: LoHa, LoKr, full diff too). LoRAs for different architectures are refused.",
    )
    merge.add_argument(
        "loras", nargs="+", metavar="LORA[:RATIO]", help="a LoRA file and its ratio (default 1; negative subtracts)"
    )
    merge.add_argument("-o", "--output", required=True, type=Path, help="output LoRA file (.safetensors)")
    merge.add_argument("--rank", metavar="N", help="re-rank each layer's summed change to N by SVD")
    merge.add_argument("--conv-rank", metavar="N", help="with --rank: the rank of 3x3 convs (default: --rank)")
    merge.add_argument(
        "--dtype",
        default="",
        choices=LORA_DTYPES,
        help="precision of the factors (default: the inputs', fp32 if mixed)",
    )
    merge.add_argument("--device", default="auto", help="where whole-change SVDs run: auto, cpu, cuda, cuda:N or mps")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing output (never an input)")
    merge.set_defaults(run=run_merge)


def lora_refs(items: list[str], blocks: list[str]):
    """``LORA[:RATIO]`` items with their block weights, as LoraRefs; RequestError naming the item."""
    from ..lora import LoraRef

    if blocks and len(blocks) not in (1, len(items)):
        raise RequestError(
            f"--blocks: given {len(blocks)} times for {len(items)} LoRAs; give it once (for every LoRA) or once per LoRA"
        )
    refs = []
    for index, item in enumerate(items):
        name, ratio = split_ratio(item)
        if not Path(name).is_file():
            raise InputError(f"{name}: no such LoRA file")
        text = blocks[0] if len(blocks) == 1 else blocks[index] if blocks else ""
        refs.append(LoraRef(name, ratio, text))
    return refs


def split_ratio(item: str) -> tuple[str, float]:
    """``style.safetensors:0.8`` -> (``style.safetensors``, 0.8); a file whose own name has a colon
    (or a Windows drive, ``C:\\lora.safetensors``) keeps it."""
    name, colon, tail = item.rpartition(":")
    if not colon or Path(item).exists():
        return item, 1.0
    try:
        return name, float(tail)
    except ValueError:
        if Path(name).exists() or not name:
            raise RequestError(f"{item}: the ratio after ':' must be a number, got {tail!r}") from None
        return item, 1.0  # a colon inside the name; the missing file is reported by name


def run_bake(args) -> int:
    from ..lora import bake, bake_request, plan_bake

    refs = lora_refs(args.loras, args.blocks)
    family = arch.UNKNOWN
    if any(ref.blocks.strip() for ref in refs):  # the block list is the checkpoint's family's
        with open_checkpoint(args.checkpoint) as reader:
            family = arch.family_of(reader.keys())
    request = bake_request(
        str(args.checkpoint),
        refs,
        family=family,
        dtype=args.dtype,
        checkpoint_format="ckpt" if args.output.suffix.lower() in (".ckpt", ".pt") else "safetensors",
        save_metadata=not args.no_metadata,
        overwrite=args.overwrite,
        device=args.device,
        output_path=str(args.output),
    )
    folder = args.output.parent if str(args.output.parent) else Path(".")
    host = FolderHost(folder, device=args.device, allow_paths=True)  # paths typed at the keyboard
    if args.dry_run:
        plan = plan_bake(request, host, hash_inputs=False)
        try:
            print(plan.report())
            return 0 if plan.ok else 1
        finally:
            plan.close()
    return _done(bake(request, host, progress=args.progress), args)


def whole_number(text: str | None, option: str) -> int | None:
    """An option's rank as an int (None when not given); RequestError naming the option."""
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        raise RequestError(f"{option}: a rank is a whole number of at least 1, got {text!r}") from None
    if value < 1:
        raise RequestError(f"{option}: a rank is a whole number of at least 1, got {value}")
    return value


def number(text: str, option: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise RequestError(f"{option}: must be a number, got {text!r}") from None


def run_extract(args) -> int:
    from ..lora import extract_lora

    rank, conv_rank = whole_number(args.rank, "--rank"), whole_number(args.conv_rank, "--conv-rank")
    for path in (args.base, args.tuned):
        if not path.is_file():
            raise InputError(f"{path}: no such checkpoint")
    folder = args.output.parent if str(args.output.parent) else Path(".")
    host = FolderHost(folder, device=args.device, allow_paths=True)  # its hash cache: the base is hashed once
    result = extract_lora(
        args.base,
        args.tuned,
        args.output,
        rank=rank,
        conv_rank=conv_rank,
        clamp_quantile=number(args.clamp_quantile, "--clamp-quantile"),
        min_diff=number(args.min_diff, "--min-diff"),
        text_encoder=not args.no_text_encoder,
        dtype=args.dtype,
        device=args.device,
        overwrite=args.overwrite,
        hash_base=lambda path: host.sha256(Checkpoint(path, path.name)),
        progress=args.progress,
    )
    return _done(result, args)


def run_merge(args) -> int:
    from ..lora import merge_loras

    rank, conv_rank = whole_number(args.rank, "--rank"), whole_number(args.conv_rank, "--conv-rank")
    pairs = []
    for item in args.loras:
        name, ratio = split_ratio(item)
        if not Path(name).is_file():
            raise InputError(f"{name}: no such LoRA file")
        pairs.append((name, ratio))
    result = merge_loras(
        pairs,
        args.output,
        rank=rank,
        conv_rank=conv_rank,
        dtype=args.dtype,
        device=args.device,
        overwrite=args.overwrite,
        progress=args.progress,
    )
    return _done(result, args)


def _done(result, args) -> int:
    """Report a written file: its notes on stderr, its path and sha256 on stdout."""
    if args.progress is not None:
        args.progress.close()
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(result.path)
    print(f"sha256 {result.sha256}")
    return 0
