"""ForgeHost: the engine's host inside Stable Diffusion WebUI Forge. The ONLY module that imports
Forge's own code (``modules_forge``, ``backend``).

Forge keeps the webui's lists, hash cache, queue, progress state, txt2img and grids, so ForgeHost
is the webui's host with what Forge does differently: its checkpoint dropdown lists names, not
titles; models load through ``checkpoint_change`` + ``forge_model_reload`` (``load_model`` and
``reload_model_weights`` are empty stubs there); and the live weights sit in
``sd_model.forge_objects`` under other key names, where its LoRA loader keeps backups.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from backend.state_dict import try_filter_state_dict
from modules import sd_models, shared
from modules_forge import main_entry

from ..errors import IncompatibleModelsError, RequestError
from ..io.formats import GGUF_SUFFIX, open_checkpoint
from . import Checkpoint
from .webui import WebuiHost, _checkpoint_info

UNET_PREFIX = "model.diffusion_model."  # Forge prefixes a bare UNet / transformer file's keys with it
LORAS_TO_APPLY_AGAIN = "merge-lab: the weights changed since the LoRAs were applied"
FP8 = {getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name)}


class ForgeHost(WebuiHost):
    """Forge's services behind the AppHost protocol; checkpoints go by name, as Forge's dropdown lists them."""

    def _switch(self, name: str) -> str:
        """Select the checkpoint the way Forge's top dropdown does, and load it now, not at the next
        generation: the next image, its infotext and a Try all see it (nothing happens when it is
        loaded already)."""
        info = _checkpoint_info(name)
        main_entry.checkpoint_change(info.name)
        sd_models.forge_model_reload()
        return info.name

    def _reload_from_file(self) -> None:
        """Forge reloads only when what to load changed; forgetting what it loaded makes it load again."""
        sd_models.model_data.forge_hash = None
        sd_models.forge_model_reload()

    def _shown_name(self, info) -> str:
        return info.name

    def _refuse_what_try_cannot_do(self, primary: str) -> None:
        if primary.lower().endswith(GGUF_SUFFIX):  # Forge loads a GGUF file's weights quantised, as they are stored
            raise RequestError(
                f"Try: {primary} is a GGUF file, which Forge holds quantised as it loads it; "
                "save the merge and load it instead"
            )
        modules = list(getattr(shared.opts, "forge_additional_modules", None) or [])
        if modules:
            raise RequestError(
                f"Try: Forge's 'VAE / Text Encoder' list has {len(modules)} module(s) chosen, which replace parts of "
                "the loaded model; empty it to Try, or save the merge and load it instead"
            )

    @contextlib.contextmanager
    def _live_weights(self, model, primary: Checkpoint) -> Iterator[tuple[Mapping, set[str]]]:
        """The live weights under the primary's key names, LoRAs taken off first.

        Forge's LoRA loader keeps each patched weight's value from before its LoRAs and puts it back
        when the LoRAs change: refreshing it with no LoRA gives every weight its file value and
        empties those backups, so the next generation patches its LoRAs over the merged weights.
        """
        objects = model.forge_objects
        for patcher in (objects.unet, objects.clip.patcher):
            patcher.model.lora_loader.refresh(lora_patches={}, offload_device=patcher.offload_device)
        with open_checkpoint(primary.path) as reader:
            shapes = {key: reader.spec(key) for key in reader.keys()}
        weights = ForgeWeights(model, shapes)
        yield weights, weights.left_out
        # The LoRA extension skips its work when the prompt's LoRAs are the ones it applied last, and
        # Forge refreshes LoRAs only when it loads a patched model anew: a hash no LoRA list has makes
        # the next image set them up again, so they patch the merged weights.
        model.current_lora_hash = LORAS_TO_APPLY_AGAIN


class ForgeWeights(Mapping):
    """A Forge model's live tensors under checkpoint key names, mapped as Forge's loader maps a file.

    Forge splits a checkpoint into its parts with the model's own guess (``backend/loader.py``,
    ``split_state_dict``): a prefix picks the UNet or the VAE, and the text encoders' keys are
    renamed, split (CLIP-G's q/k/v) or transposed (text projections) by the guess's functions.
    The same functions run here, one key at a time: on empty (meta) tensors to check the mapping
    and the shapes before anything is merged, then on each merged tensor. A key that lands on no
    live tensor is one Forge does not load either (``left_out``).
    """

    def __init__(self, model, specs: Mapping):
        self.guess = model.model_config
        objects = model.forge_objects
        modules = {
            self.guess.unet_target: objects.unet.model.diffusion_model,
            self.guess.vae_target: objects.vae.first_stage_model,
        }
        modules.update({name: getattr(objects.clip.cond_stage_model, name) for name in self.guess.clip_target})
        _refuse_quantised(modules)
        self.live = {component: module.state_dict() for component, module in modules.items()}
        self.bare = not any(key.startswith(UNET_PREFIX.rstrip(".")) for key in specs)
        self.shapes: dict[str, torch.Size] = {}
        self.left_out: set[str] = set()
        for key, spec in specs.items():
            parts = self._landing(key, torch.empty(spec.shape, dtype=spec.dtype, device="meta"))
            if parts:
                self.shapes[key] = torch.Size(spec.shape)
            else:
                self.left_out.add(key)

    def _parts(self, key: str, tensor: torch.Tensor) -> list[tuple[str, str, torch.Tensor]]:
        """(component, its key, tensor) for one checkpoint key, by the steps of ``split_state_dict``."""
        guess = self.guess
        state = guess.process_vae_state_dict({(UNET_PREFIX + key) if self.bare else key: tensor})
        for component, prefixes in (
            (guess.unet_target, guess.unet_key_prefix),
            (guess.vae_target, guess.vae_key_prefix),
        ):
            found = try_filter_state_dict(state, prefixes)
            if found:
                return [(component, name, value) for name, value in found.items()]
        state = guess.process_clip_state_dict(state)
        return [
            (clip, name, value)
            for clip in guess.clip_target
            for name, value in try_filter_state_dict(state, [clip + "."]).items()
        ]

    def _landing(self, key: str, tensor: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(live tensor, value) for each part of ``key`` that Forge's model has; shapes checked."""
        landing = []
        for component, name, value in self._parts(key, tensor):
            live = self.live[component].get(name)
            if live is None:
                continue  # Forge loads with strict=False: a part its model lacks is dropped
            if live.shape != value.shape:
                raise IncompatibleModelsError(
                    f"{key}: Forge's loaded model has {list(live.shape)} at {component}.{name}, the merge {list(value.shape)}"
                )
            landing.append((live, value))
        return landing

    def get(self, key: str, default=None):
        return _Landing(self, key) if key in self.shapes else default

    def __getitem__(self, key: str):
        if key not in self.shapes:
            raise KeyError(key)
        return _Landing(self, key)

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


class _Landing:
    """What the engine copies one merged tensor into: the live tensors its key becomes in Forge."""

    def __init__(self, weights: ForgeWeights, key: str):
        self.weights = weights
        self.key = key
        self.shape = weights.shapes[key]

    def copy_(self, tensor: torch.Tensor) -> None:
        for live, value in self.weights._landing(self.key, tensor):
            live.copy_(value)  # casts to the live dtype, as Forge's load_state_dict does


def _refuse_quantised(modules: Mapping) -> None:
    """Weights Forge holds quantised (GGUF, bitsandbytes nf4/fp4) or in fp8 would not take a merged
    tensor the way loading the file gives it: refused, never merged approximately."""
    for component, module in modules.items():
        for name, parameter in module.named_parameters():
            kind = (
                "GGUF" if getattr(parameter, "gguf_cls", None) is not None
                else "bitsandbytes nf4/fp4" if hasattr(parameter, "bnb_quantized")
                else str(parameter.dtype).removeprefix("torch.") if parameter.dtype in FP8
                else None
            )  # fmt: skip
            if kind is not None:
                raise RequestError(
                    f"Try: Forge holds the loaded model's {component} in {kind} ({name}); "
                    "save the merge and load it instead"
                )
