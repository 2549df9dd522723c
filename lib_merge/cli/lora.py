"""The LoRA commands of the command line: ``lora bake CHECKPOINT LORA[:RATIO]... -o OUT``."""

from __future__ import annotations

import sys
from pathlib import Path

from .. import arch, precision
from ..errors import InputError, RequestError
from ..hosts import FolderHost
from ..io.formats import open_checkpoint

BLOCKS_HELP = (
    "per-block weights, multiplied by the LoRA's ratio (LoRA Block Weight's convention), in the block grammar of "
    "merges: a comma list (SD1: BASE,IN00..IN11,M00,OUT00..OUT11; SDXL: BASE,IN00..IN08,M00,OUT00..OUT08; Flux: "
    "BASE,D00..D18,S00..S37), a preset, or BLOCK=weight items (IN*=0,OUT05=0.5; blocks not named weigh 1). "
    "Given once it applies to every LoRA; given once per LoRA, the Nth applies to the Nth LoRA ('' for none)"
)


def add_commands(commands) -> None:
    """Register ``lora`` and its actions."""
    lora = commands.add_parser("lora", help="LoRA files: bake them into a checkpoint")
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
    result = bake(request, host, progress=args.progress)
    if args.progress is not None:
        args.progress.close()
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(result.path)
    print(f"sha256 {result.sha256}")
    return 0
