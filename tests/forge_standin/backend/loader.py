"""backend/loader.py: ``forge_loader`` splits a checkpoint into UNet, VAE and text encoders with a
guess of its family, then loads each part into its module. The guesses copy what Forge's
huggingface_guess does to the keys of SD1.5 (``cond_stage_model.`` -> ``clip_l.``) and SDXL (the
two text encoders; CLIP-G's ``in_proj`` split in three, its ``text_projection`` transposed), not
every rename: the live modules here are built from the same split, so any rename round-trips."""

from types import MappingProxyType, SimpleNamespace

import safetensors.torch
import torch

from backend.state_dict import try_filter_state_dict


class Guess:
    unet_target, vae_target = "unet", "vae"
    unet_key_prefix = ("model.diffusion_model.",)
    vae_key_prefix = ("first_stage_model.",)

    def process_vae_state_dict(self, sd):
        return sd


class SD15(Guess):
    clip_target = MappingProxyType({"clip_l": "text_encoder"})

    def process_clip_state_dict(self, sd):
        return {
            "clip_l." + k.removeprefix("cond_stage_model."): v
            for k, v in sd.items()
            if k.startswith("cond_stage_model.")
        }


class SDXL(Guess):
    clip_target = MappingProxyType({"clip_l": "text_encoder", "clip_g": "text_encoder_2"})

    def process_clip_state_dict(self, sd):
        out = {}
        for key, value in sd.items():
            if key.startswith("conditioner.embedders.0.transformer."):
                out["clip_l." + key.removeprefix("conditioner.embedders.0.")] = value
            elif key.startswith("conditioner.embedders.1.model."):
                name = "clip_g." + key.removeprefix("conditioner.embedders.1.model.")
                if ".attn.in_proj_" in name:
                    third, kind = value.shape[0] // 3, name.rsplit("_", 1)[1]
                    for index, part in enumerate(("q_proj", "k_proj", "v_proj")):
                        out[name.replace(f"attn.in_proj_{kind}", f"attn.{part}.{kind}")] = value[
                            third * index : third * (index + 1)
                        ]
                elif name == "clip_g.text_projection":
                    out["clip_g.text_projection.weight"] = value.transpose(0, 1).contiguous()
                else:
                    out[name] = value
        return out


class LoraLoader:
    """backend/patcher/lora.py's LoraLoader: patched weights' old values in ``backup``, put back by
    ``refresh`` when the LoRAs change (here: any refresh with other patches than the applied ones)."""

    def __init__(self, model):
        self.model = model
        self.backup: dict = {}
        self.refreshes: list = []

    def refresh(self, lora_patches, offload_device=None, force_refresh=False):
        self.refreshes.append(dict(lora_patches))
        for key, value in self.backup.items():
            dict(self.model.named_parameters())[key].data.copy_(value)
        self.backup = {}

    def apply(self, key: str, delta: torch.Tensor) -> None:
        """A LoRA patched onto ``key``: the old value backed up, as Forge's loader does."""
        weight = dict(self.model.named_parameters())[key]
        self.backup.setdefault(key, weight.detach().clone())
        weight.data += delta


def module_from(state: dict) -> torch.nn.Module:
    """Modules nested by the dotted key names, each tensor a parameter (a buffer if not float)."""
    root = torch.nn.Module()
    for key, value in state.items():
        *path, leaf = key.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, torch.nn.Module())
            node = getattr(node, part)
        if value.is_floating_point():
            node.register_parameter(leaf, torch.nn.Parameter(value.float().clone(), requires_grad=False))
        else:
            node.register_buffer(leaf, value.clone())
    return root


def patcher(model) -> SimpleNamespace:
    model.lora_loader = LoraLoader(model)
    return SimpleNamespace(model=model, offload_device=torch.device("cpu"))


def forge_loader(path: str):
    sd = safetensors.torch.load_file(path)
    guess = SDXL() if any(k.startswith("conditioner.") for k in sd) else SD15()
    unet = try_filter_state_dict(sd, guess.unet_key_prefix)
    vae = try_filter_state_dict(sd, guess.vae_key_prefix)
    sd = guess.process_clip_state_dict(sd)
    clips = {name: module_from(try_filter_state_dict(sd, [name + "."])) for name in guess.clip_target}
    kmodel = torch.nn.Module()
    kmodel.add_module("diffusion_model", module_from(unet))
    cond_stage_model = torch.nn.ModuleDict(clips)
    objects = SimpleNamespace(
        unet=patcher(kmodel),
        clip=SimpleNamespace(cond_stage_model=cond_stage_model, patcher=patcher(cond_stage_model)),
        vae=SimpleNamespace(first_stage_model=module_from(vae)),
    )
    return SimpleNamespace(forge_objects=objects, model_config=guess, current_lora_hash=str([]))
