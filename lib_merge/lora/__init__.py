"""LoRA files in the merge: read kohya, LyCORIS and diffusers/PEFT LoRAs and bake them into a checkpoint.

from lib_merge.lora import LoraRef, bake, bake_request
request = bake_request("model.safetensors", [LoraRef("style.safetensors", 0.8)], family="SD1",
                       output_path="baked.safetensors")
result = bake(request, FolderHost(".", allow_paths=True))
"""

from __future__ import annotations

from .bake import LoraRef, bake, bake_request, plan_bake
from .reader import LoraReader

__all__ = ["LoraReader", "LoraRef", "bake", "bake_request", "plan_bake"]
