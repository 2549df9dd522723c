"""The Forge adapter (lib_merge.hosts.forge) against tests/forge_standin: Forge's own modules cannot be
installed from a package registry, so the stand-in copies what the adapter relies on (see its
``modules/__init__.py``). The real Forge is exercised by tests/test_forge_e2e.py."""

from __future__ import annotations

import importlib
import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch
from conftest import SDXL, make

from lib_merge import actions
from lib_merge.errors import CancelledError, RequestError
from lib_merge.io.readers import TensorSpec

TESTS = Path(__file__).parent
ROOT = TESTS.parent


def standin_modules(monkeypatch):
    for name in [n for n in sys.modules if n.split(".")[0] in ("modules", "modules_forge", "backend")]:
        monkeypatch.delitem(sys.modules, name, raising=False)
    for name in ("lib_merge.hosts.webui", "lib_merge.hosts.forge"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(TESTS / "forge_standin"))


@pytest.fixture
def forge(tmp_path, monkeypatch):
    """A stand-in Forge whose checkpoint folder holds a, b (SD1.5) and xa, xb (SDXL, CLIP-G's in_proj whole)."""
    standin_modules(monkeypatch)
    folder = tmp_path / "Stable-diffusion"
    make(folder / "a.safetensors", seed=1)
    make(folder / "b.safetensors", seed=2)
    sdxl = {**SDXL}
    for key, spec in SDXL.items():
        if ".attn.in_proj_" in key:  # q, k and v stacked, as in a real file: Forge splits them in three
            sdxl[key] = TensorSpec(spec.dtype, (12, *spec.shape[1:]))
    make(folder / "xa.safetensors", specs=sdxl, seed=3)
    make(folder / "xb.safetensors", specs=sdxl, seed=4)
    names = ("shared", "sd_models", "call_queue", "progress")
    modules = SimpleNamespace(**{name: importlib.import_module(f"modules.{name}") for name in names})
    modules.main_entry = importlib.import_module("modules_forge.main_entry")
    modules.shared.cmd_opts.ckpt_dir = str(folder)
    modules.shared.opts.data["forge_additional_modules"] = []
    modules.sd_models.list_models()
    modules.folder = folder
    modules.host_module = importlib.import_module("lib_merge.hosts.forge")
    yield modules
    for name in ("lib_merge.hosts.webui", "lib_merge.hosts.forge"):
        monkeypatch.delitem(sys.modules, name, raising=False)


@pytest.fixture
def host(forge):
    return forge.host_module.ForgeHost()


def request(primary="a.safetensors", secondary="b.safetensors", **fields):
    base = {"primary_model_name": primary, "secondary_model_name": secondary, "multiplier": 0.3, "save_as_half": True}
    return actions.request_from_fields({**base, **fields})[0]


def live_state(model) -> dict[str, torch.Tensor]:
    objects = model.forge_objects
    parts = {
        "unet": objects.unet.model.diffusion_model,
        "vae": objects.vae.first_stage_model,
        "clip": objects.clip.cond_stage_model,
    }
    return {
        f"{part}.{key}": value.clone() for part, module in parts.items() for key, value in module.state_dict().items()
    }


def test_the_entry_script_picks_forges_host_in_forge(forge):
    pytest.importorskip("gradio")
    callbacks = importlib.import_module("modules.script_callbacks")
    runpy.run_path(str(ROOT / "scripts" / "merge_lab.py"))
    [tabs] = callbacks.registered["ui_tabs"]
    assert tabs.args[0] is sys.modules["lib_merge.hosts.forge"].ForgeHost


def test_checkpoints_go_by_name_as_forges_dropdown_lists_them(host, forge):
    assert host.checkpoints() == ["a.safetensors", "b.safetensors", "xa.safetensors", "xb.safetensors"]
    outcome = actions.run_merge(host, request(), load=False)
    assert outcome.title == "0.7(a) + 0.3(b).safetensors"  # a name: a title is not among the dropdown's choices
    assert outcome.title in host.checkpoints()


def test_load_selects_and_loads_now_under_the_queue_lock(host, forge):
    lock_held = []
    real_reload = forge.sd_models.forge_model_reload

    def reload():
        lock_held.append(forge.call_queue.queue_lock.held())
        return real_reload()

    forge.sd_models.forge_model_reload = reload
    outcome = actions.run_merge(host, request(), load=True)
    assert outcome.loaded and lock_held == [True]
    assert forge.shared.opts.sd_model_checkpoint == outcome.title
    assert forge.sd_models.loads == [outcome.title]  # loaded now, not at the next generation
    assert forge.shared.sd_model.sd_checkpoint_info.name == outcome.title


def test_try_writes_what_loading_the_merged_file_gives_under_forges_names(host, forge, tmp_path):
    host.load("a.safetensors")
    host.try_merge(request())
    tried = live_state(forge.shared.sd_model)
    outcome = actions.run_merge(host, request(custom_name="saved"), load=True)
    assert forge.sd_models.loads[-1] == outcome.title == "saved.safetensors"
    loaded = live_state(forge.shared.sd_model)
    assert tried.keys() == loaded.keys()
    assert all(torch.equal(tried[key], loaded[key]) for key in loaded)
    plain = live_state(importlib.import_module("backend.loader").forge_loader(str(forge.folder / "a.safetensors")))
    assert not torch.equal(plain["unet.time_embed.0.weight"], tried["unet.time_embed.0.weight"])


def test_try_names_the_merge_and_restore_reloads_the_file(host, forge):
    host.load("a.safetensors")
    result = host.try_merge(request())
    model = forge.shared.sd_model
    assert model.sd_checkpoint_info.name_for_extra == result.name == "0.7(a) + 0.3(b)"
    assert model.sd_model_hash == result.recipe_hash
    assert host.tried_request() == request()
    assert host.try_merge(request()) is result  # the same request again costs nothing
    loads = len(forge.sd_models.loads)
    assert host.restore() == "a.safetensors"
    assert len(forge.sd_models.loads) == loads + 1 and host.tried_request() is None
    host.load("a.safetensors")
    assert len(forge.sd_models.loads) == loads + 1  # a checkpoint as loaded is kept


def test_try_in_sdxl_splits_clip_g_q_k_v_as_forge_does(host, forge):
    host.load("xa.safetensors")
    host.try_merge(request("xa.safetensors", "xb.safetensors"))
    tried = live_state(forge.shared.sd_model)
    merged = actions.run_merge(host, request("xa.safetensors", "xb.safetensors", custom_name="x"), load=False)
    file = safetensors.torch.load_file(str(merged.path))
    stacked = file["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"].float()
    live = [tried[f"clip.clip_g.transformer.resblocks.0.attn.{part}.weight"] for part in ("q_proj", "k_proj", "v_proj")]
    assert torch.equal(torch.cat(live), stacked)


def test_loras_come_off_before_a_try_and_patch_over_the_merge_after(host, forge):
    host.load("a.safetensors")
    model = forge.shared.sd_model
    unet = model.forge_objects.unet.model
    key = "diffusion_model.time_embed.0.weight"
    unet.lora_loader.apply(key, torch.full_like(dict(unet.named_parameters())[key], 5.0))
    host.try_merge(request())
    assert unet.lora_loader.refreshes == [{}] and unet.lora_loader.backup == {}
    # and the LoRA extension, which skips LoRAs it applied last, sets them up again at the next image
    assert model.current_lora_hash not in (str([]), str([["lora.safetensors", 1.0, 1.0, False]]))
    merged = actions.run_merge(host, request(custom_name="m"), load=False)
    expected = safetensors.torch.load_file(str(merged.path))["model.diffusion_model.time_embed.0.weight"].float()
    assert torch.equal(dict(unet.named_parameters())[key], expected)


def test_try_refuses_quantised_weights_and_chosen_modules_and_keeps_the_model(host, forge):
    host.load("a.safetensors")
    model = forge.shared.sd_model
    weight = model.forge_objects.unet.model.diffusion_model.get_parameter("time_embed.0.weight")
    weight.gguf_cls = object()
    before = weight.detach().clone()
    with pytest.raises(RequestError, match=r"Try: Forge holds the loaded model's unet in GGUF \(time_embed.0.weight\)"):
        host.try_merge(request())
    del weight.gguf_cls
    unet = forge.shared.sd_model.forge_objects.unet.model.diffusion_model
    assert torch.equal(unet.get_parameter("time_embed.0.weight"), before)
    forge.shared.opts.data["forge_additional_modules"] = ["/models/VAE/sdxl_vae.safetensors"]
    with pytest.raises(RequestError, match="'VAE / Text Encoder' list has 1 module"):
        host.try_merge(request())
    # a GGUF primary needs those modules in Forge; its own refusal says what matters more
    with pytest.raises(RequestError, match=r"Try: unet\.gguf is a GGUF file, which Forge holds quantised"):
        host.try_merge(request("unet.gguf"))
    assert torch.equal(unet.get_parameter("time_embed.0.weight"), before)


def test_a_cancelled_try_reloads_the_file(host, forge):
    host.load("a.safetensors")
    plain = live_state(forge.shared.sd_model)
    loads = len(forge.sd_models.loads)
    asked = []

    def stop_halfway() -> bool:
        asked.append(True)
        return len(asked) > 500

    with pytest.raises(CancelledError):
        host.try_merge(request(), should_stop=stop_halfway)
    assert len(forge.sd_models.loads) == loads + 1 and host.tried_request() is None
    reloaded = live_state(forge.shared.sd_model)
    assert all(torch.equal(plain[key], reloaded[key]) for key in plain)
