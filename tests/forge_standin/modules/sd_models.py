"""modules/sd_models.py as Forge has it: the webui's checkpoint list (from the webui stand-in), but
``checkpoint_tiles`` lists names, ``reload_model_weights`` is an empty stub, and models load through
``forge_model_reload``, only when what ``checkpoint_change`` selected differs from what is loaded."""

from pathlib import Path
from types import SimpleNamespace

from modules import shared

_webui = Path(__file__).resolve().parents[2] / "webui_standin" / "modules" / "sd_models.py"
exec(compile(_webui.read_text(), str(_webui), "exec"))  # the webui's CheckpointInfo, list_models, lists

model_data = SimpleNamespace(forge_loading_parameters={}, forge_hash=None, sd_model=None)
loads: list[str] = []  # the file each real load read


def checkpoint_tiles(use_short=False):
    return [info.name for info in checkpoints_list.values()]  # noqa: F821 (from the webui stand-in)


def get_closet_checkpoint_match(search_string):
    return checkpoint_aliases.get(search_string) or checkpoints_list.get(search_string)  # noqa: F821


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    pass  # Forge: an empty stub


def forge_model_reload():
    from backend.loader import forge_loader

    current_hash = str(model_data.forge_loading_parameters)
    if model_data.forge_hash == current_hash:
        return model_data.sd_model, False
    info = model_data.forge_loading_parameters["checkpoint_info"]
    model = forge_loader(info.filename)
    model.sd_checkpoint_info = info
    model.sd_model_hash = info.shorthash
    loads.append(info.name)
    model_data.sd_model = shared.sd_model = model
    model_data.forge_hash = current_hash
    return model, True
