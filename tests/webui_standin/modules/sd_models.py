"""modules/sd_models.py: CheckpointInfo names and titles, list_models, checkpoint_tiles, reloading."""

import os

from modules import hashes, shared

model_path = os.path.abspath("models/Stable-diffusion")
checkpoints_list: dict = {}
checkpoint_aliases: dict = {}
reloads: list[str] = []  # the opts.sd_model_checkpoint each reload_model_weights call saw
fail_next_reload = False


class CheckpointInfo:
    def __init__(self, filename):
        self.filename = filename
        abspath = os.path.abspath(filename)
        ckpt_dir = os.path.abspath(shared.cmd_opts.ckpt_dir) if shared.cmd_opts.ckpt_dir is not None else None
        if ckpt_dir and abspath.startswith(ckpt_dir):
            name = abspath.replace(ckpt_dir, "")
        elif abspath.startswith(model_path):
            name = abspath.replace(model_path, "")
        else:
            name = os.path.basename(filename)
        name = name.lstrip("/\\")
        self.name = name
        self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
        self.sha256 = hashes.sha256_from_cache(self.filename, f"checkpoint/{name}")
        self.shorthash = self.sha256[0:10] if self.sha256 else None
        self.title = name if self.shorthash is None else f"{name} [{self.shorthash}]"
        self.short_title = (
            self.name_for_extra if self.shorthash is None else f"{self.name_for_extra} [{self.shorthash}]"
        )
        self.ids = [self.title, name, self.name_for_extra]
        if self.shorthash:
            self.ids += [self.shorthash, self.sha256, f"{self.name_for_extra} [{self.shorthash}]"]

    def register(self):
        checkpoints_list[self.title] = self
        for alias in self.ids:
            checkpoint_aliases[alias] = self


def list_models():
    checkpoints_list.clear()
    checkpoint_aliases.clear()
    folder = shared.cmd_opts.ckpt_dir or model_path
    for root, _dirs, files in os.walk(folder):
        for file in sorted(files):
            if file.endswith((".ckpt", ".safetensors")) and not file.endswith((".vae.ckpt", ".vae.safetensors")):
                CheckpointInfo(os.path.join(root, file)).register()


def checkpoint_tiles(use_short=False):
    return [x.short_title if use_short else x.title for x in checkpoints_list.values()]


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    """Loads the checkpoint the option names (a forced reload is recorded with a "forced " prefix);
    the real one runs under the queue lock too, and gives the model the checkpoint's own info."""
    global fail_next_reload
    reloads.append(("forced " if forced_reload else "") + str(shared.opts.sd_model_checkpoint))
    if forced_reload and getattr(shared, "sd_model", None) is not None:
        shared.sd_model.sd_checkpoint_info = checkpoint_aliases[shared.opts.sd_model_checkpoint]
    if fail_next_reload:
        fail_next_reload = False
        raise RuntimeError("CUDA out of memory (stand-in)")
    if checkpoint_aliases.get(shared.opts.sd_model_checkpoint) is None:
        raise FileNotFoundError(shared.opts.sd_model_checkpoint)
