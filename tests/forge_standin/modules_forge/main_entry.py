"""modules_forge/main_entry.py: ``checkpoint_change`` sets the option and records what to load
(``refresh_model_loading_parameters``); it loads nothing, and does nothing for the same checkpoint."""

from modules import sd_models, shared

changes: list[str] = []


def checkpoint_change(ckpt_name: str, save=True, refresh=True) -> bool:
    new = sd_models.get_closet_checkpoint_match(ckpt_name)
    current = sd_models.get_closet_checkpoint_match(shared.opts.data.get("sd_model_checkpoint") or "")
    if new == current:
        return False
    changes.append(ckpt_name)
    shared.opts.data["sd_model_checkpoint"] = ckpt_name
    if save:
        shared.opts.save(shared.config_filename)
    if refresh:
        sd_models.model_data.forge_loading_parameters = {"checkpoint_info": new}
    return True
