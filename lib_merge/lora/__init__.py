"""LoRA files in the merge: read kohya, LyCORIS and diffusers/PEFT LoRAs and bake them into a checkpoint,
extract a LoRA from two checkpoints, merge LoRAs into one.

from lib_merge.lora import LoraRef, bake, bake_request
request = bake_request("model.safetensors", [LoraRef("style.safetensors", 0.8)], family="SD1",
                       output_path="baked.safetensors")
result = bake(request, FolderHost(".", allow_paths=True))
extract_lora("base.safetensors", "tuned.safetensors", "diff.safetensors", rank=32)
merge_loras([("style.safetensors", 0.8), ("detail.safetensors", 0.5)], "both.safetensors")
"""

from __future__ import annotations

from .bake import LoraRef, bake, bake_request, plan_bake
from .combine import merge_loras
from .extract import extract_lora
from .kohya import LoraResult
from .reader import LoraReader

__all__ = [
    "LoraReader",
    "LoraRef",
    "LoraResult",
    "bake",
    "bake_request",
    "extract_lora",
    "merge_loras",
    "plan_bake",
]
