"""WebuiHost: the engine's host inside AUTOMATIC1111's webui. The ONLY module that imports ``modules``.

Everything the webui gives Merge Lab goes through here: its checkpoint and VAE lists, its output
folder and device, its hash cache (seeded with the sha256 the writer computed, so a fresh file is
never read again), its queue lock and progress state, its own way to switch models, its loaded
model (Try merges into it), its txt2img and grid helpers (sweeps), and its X/Y/Z plot (axes).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

from modules import call_queue, devices, hashes, images, processing, sd_hijack, sd_models, sd_samplers, sd_vae, shared
from modules import progress as webui_progress
from PIL import Image

from ..errors import CancelledError, InputError, RequestError
from ..loop.runner import Generated, ImageSettings
from . import LORA_SUFFIXES, Checkpoint, devices_here, hash_file, list_files, lora_in_folder

MERGE_JOB = "merge-lab"  # shared.state.job while a merge runs


class WebuiHost:
    """The webui's services behind the AppHost protocol; names are the webui's checkpoint titles."""

    can_load = True

    def __init__(self):
        self._owner: str | None = None  # who started the running Merge Lab job; None while none runs

    @property
    def can_run_code(self) -> bool:
        """A greedy soup's scorer imports code: allowed where the webui allows installing extensions
        (its own rule: not with --listen, --share, --ngrok or --server-name, unless
        --enable-insecure-extension-access)."""
        return not getattr(shared.cmd_opts, "disable_extension_access", True)

    def checkpoints(self) -> list[str]:
        return sd_models.checkpoint_tiles()

    def refresh(self) -> None:
        sd_models.list_models()
        sd_vae.refresh_vae_list()

    def resolve(self, name: str) -> Checkpoint:
        info = _checkpoint_info(name)
        return Checkpoint(Path(info.filename), info.name)

    def sha256(self, checkpoint: Checkpoint) -> str:
        # The webui's cached hash when it has one; --no-hashing makes it None, but a recipe needs one.
        # (The Lora extension caches a LoRA's hash of its tensors only, under "hashes-addnet": this
        # whole-file hash is kept apart, in the same cache as the webui's whole-file hashes.)
        title = f"lora/{checkpoint.name}" if checkpoint.lora else f"checkpoint/{checkpoint.name}"
        digest = hashes.sha256(str(checkpoint.path), title)
        return digest or hash_file(checkpoint.path)

    def resolve_lora(self, name: str) -> Checkpoint:
        return lora_in_folder(self.lora_dir(), name)

    def loras(self) -> list[str]:
        return list_files(self.lora_dir(), LORA_SUFFIXES)

    def lora_dir(self) -> Path:
        """The folder the Lora extension lists (``--lora-dir``, models/Lora by default)."""
        folder = getattr(shared.cmd_opts, "lora_dir", None)
        if not folder:
            raise InputError("the webui has no LoRA folder (is the built-in Lora extension disabled?)")
        return Path(folder)

    def register_lora(self, path: Path) -> str:
        """Rescan the Lora extension's list, so the prompt and the cards know the new file at once."""
        networks = sys.modules.get("networks")  # the Lora extension's module, as its scripts import it
        if hasattr(networks, "list_available_networks"):
            networks.list_available_networks()
        return Path(path).relative_to(self.lora_dir()).as_posix()

    def vae_path(self, name: str) -> Path | None:
        path = sd_vae.vae_dict.get(name)
        return Path(path) if path else None

    def vaes(self) -> list[str]:
        return list(sd_vae.vae_dict)

    def output_dir(self) -> Path:
        return Path(shared.cmd_opts.ckpt_dir or sd_models.model_path)

    def register(self, path: Path, sha256: str) -> str:
        """Seed the webui's hash cache, rescan, and return the new checkpoint's title."""
        name = sd_models.CheckpointInfo(str(path)).name
        hashes.cache("hashes")[f"checkpoint/{name}"] = {"mtime": os.path.getmtime(path), "sha256": sha256}
        hashes.dump_cache()
        sd_models.list_models()
        info = sd_models.checkpoint_aliases.get(name)
        if info is not None:
            return self._shown_name(info)
        raise InputError(f"{path}: written, but the webui does not list it (is it outside the checkpoint folder?)")

    def device(self) -> str:
        """The Merge Lab setting when the user chose one, else the device the webui generates on."""
        return getattr(shared.opts, "merge_lab_device", "") or str(devices.device)

    @property
    def load_by_default(self) -> bool:
        return bool(getattr(shared.opts, "merge_lab_load_default", True))

    def devices(self) -> list[str]:
        return devices_here(self.device())

    def load(self, name: str) -> str:
        """Make ``name`` the current model as its file holds it, the way the settings do.

        A model holding a tried merge over that same file counts as that file for the webui, which
        would keep it: it is reloaded from the file.
        """
        title = self._switch(name)
        if self.tried_request() is not None:
            self._reload_from_file()
        return title

    def _reload_from_file(self) -> None:
        """Load the current checkpoint afresh from its file, whatever the loaded model holds."""
        sd_models.reload_model_weights(forced_reload=True)

    def _switch(self, name: str) -> str:
        """Set the option and reload the weights (nothing happens when that file is loaded already).

        Called while this host's job holds the queue lock, so the reload that the option's onchange
        would queue is called directly here.
        """
        title = _checkpoint_info(name).title
        previous = shared.opts.sd_model_checkpoint
        shared.opts.set("sd_model_checkpoint", title, run_callbacks=False)
        try:
            sd_models.reload_model_weights()
        except Exception:
            shared.opts.set("sd_model_checkpoint", previous, run_callbacks=False)
            raise
        if title != previous:  # a Try or a sweep point switches to the loaded file: no config write
            shared.opts.save(shared.config_filename)
        return title

    def try_merge(self, request, *, progress=None, should_stop=None, inputs=None):
        """The merge streamed into the loaded model, no file: the primary is loaded the host's way,
        then each merged tensor is copied into its weights in place (``lib_merge.merge_into``).

        The model keeps the primary's file name, so generating does not reload it; a fresh checkpoint
        info names the merge in the infotext (Model: its name, Model hash: its recipe hash) and
        makes the host drop prompt conditionings cached for the old text encoder. The request is
        kept on that info (``tried_request``): the same request again costs nothing. After an error
        or a cancel, the primary is reloaded from its file: half-merged weights are never kept.
        """
        from .. import merge_into

        primary = next(request.root().models()).name
        self._refuse_what_try_cannot_do(primary)
        self._switch(primary)  # no reload when it is loaded (or tried on) already
        model = shared.sd_model
        previous = getattr(model.sd_checkpoint_info, TRIED, None)
        if previous is not None and previous[0] == request:
            return previous[1]
        try:
            with self._live_weights(model, self.resolve(primary)) as (weights, left_out):
                result = merge_into(request, self, weights, progress=progress, should_stop=should_stop, inputs=inputs)
        except BaseException:
            self._reload_from_file()
            raise
        result.missing = [key for key in result.missing if key not in left_out]  # left out on purpose: not missing
        tried = copy.copy(model.sd_checkpoint_info)
        tried.name_for_extra = result.name
        setattr(tried, TRIED, (request, result))
        model.sd_checkpoint_info = tried
        model.sd_model_hash = result.recipe_hash
        return result

    def _refuse_what_try_cannot_do(self, primary: str) -> None:
        """Cases where weights written in place would differ from loading the merged file: refused."""
        if devices.fp8:
            raise RequestError("Try: the model is held in fp8 (FP8 weight setting); save the merge and load it instead")
        if getattr(shared.opts, "sd_checkpoints_limit", 1) > 1:
            raise RequestError(
                "Try: the webui keeps several checkpoints loaded (Maximum number of checkpoints loaded at the same "
                "time > 1), and would reuse the tried model as the primary; set it to 1 or save the merge instead"
            )

    @contextlib.contextmanager
    def _live_weights(self, model, primary: Checkpoint):
        """The loaded model's tensors under checkpoint key names, and the keys deliberately left as loaded.

        Keys without "model" in their name are never merged (the built-in's rule), so the primary's
        values, which the webui may have adjusted after loading (the alphas schedule), stay; nor is
        the VAE when one chosen in settings overrides the checkpoint's. The hijack is undone for the
        merge, so the state dict has the checkpoint's key names.
        """
        keep_vae = sd_vae.loaded_vae_file is not None
        sd_hijack.model_hijack.undo_hijack(model)
        try:
            state = model.state_dict()
            weights = {
                key: tensor
                for key, tensor in state.items()
                if "model" in key and not (keep_vae and key.startswith("first_stage_model."))
            }
            yield weights, set(state) - set(weights)
        finally:
            sd_hijack.model_hijack.hijack(model)
        _forget_weight_backups(model)

    def tried_request(self):
        """The request merged into the loaded model, or None when it holds a checkpoint as loaded."""
        model = getattr(shared, "sd_model", None)
        tried = getattr(getattr(model, "sd_checkpoint_info", None), TRIED, None)
        return tried[0] if tried is not None else None

    def restore(self) -> str:
        """Reload the loaded checkpoint from its file (a tried merge is dropped); returns its title."""
        self._reload_from_file()
        return self._shown_name(shared.sd_model.sd_checkpoint_info)

    def _shown_name(self, info) -> str:
        """How the host's checkpoint dropdown names a checkpoint: the webui by its title."""
        return info.title

    def samplers(self) -> list[str]:
        return list(sd_samplers.visible_sampler_names())

    def generate(self, settings: ImageSettings) -> Generated:
        """One txt2img image from the loaded model, saved as txt2img saves its images."""
        p = _txt2img(settings)
        p.scripts = None  # the sweep's images are plain txt2img; the txt2img tab's scripts are not run
        try:
            processed = processing.process_images(p)
        finally:
            p.close()
        if shared.state.interrupted or not processed.images:
            raise CancelledError("cancelled while generating")
        return Generated(processed.images[0], processed.infotexts[0])

    def save_grid(self, cells: list, x_labels: list[str], y_labels: list[str], settings: ImageSettings, info: str):
        """The webui's grid and annotations, saved where it saves grids (when it saves grids)."""
        width, height = cells[0].size
        blank = Image.new("RGB", (width, height), shared.opts.grid_background_color)
        cells = cells + [blank] * (len(x_labels) * len(y_labels) - len(cells))  # a row cut short by Cancel
        grid = images.image_grid(cells, rows=len(y_labels))
        grid = images.draw_grid_annotations(
            grid, width, height, [[images.GridAnnotation(x)] for x in x_labels],
            [[images.GridAnnotation(y)] for y in y_labels],
        )  # fmt: skip
        if not shared.opts.grid_save:
            return grid, None
        p = _txt2img(settings)
        path, _ = images.save_image(
            grid, p.outpath_grids, "merge_lab_sweep", settings.seed, settings.prompt, shared.opts.grid_format,
            info=info, grid=True, p=p,
        )  # fmt: skip
        return grid, Path(path).resolve()

    @contextlib.contextmanager
    def job(self, task_id: str = "", jobs: int = 1, owner: str = "") -> Iterator[None]:
        """One job at a time with generation, visible in /sdapi/v1/progress and the page's progress bar."""
        task_id = task_id or f"task(merge-lab-{uuid.uuid4().hex[:12]})"
        webui_progress.add_task_to_queue(task_id)
        with call_queue.queue_lock:
            shared.state.begin(job=MERGE_JOB)
            webui_progress.start_task(task_id)
            shared.state.job_count = jobs  # a sweep's points: the progress bar advances per image
            shared.state.textinfo = "Merge Lab: preflight"
            self._owner = owner
            try:
                yield
            finally:
                self._owner = None
                webui_progress.finish_task(task_id)
                shared.state.end()
                shared.state.interrupted = False
                devices.torch_gc()

    def report(self, progress) -> None:
        shared.state.sampling_steps = progress.keys_total
        shared.state.sampling_step = progress.keys_done
        shared.state.textinfo = f"Merge Lab: {progress.key}"
        if progress.note:
            print(f"Merge Lab: {progress.note}")

    def should_stop(self) -> bool:
        return bool(shared.state.interrupted)

    def interrupt(self, owner: str) -> bool:
        """Stop the running Merge Lab job if ``owner`` (a page, an API client) started it: Cancel
        in one page must stop neither another page's merge nor anyone's txt2img."""
        if not owner or owner != self._owner or shared.state.job != MERGE_JOB:
            return False
        shared.state.interrupt()
        return True

    def api_auth(self) -> dict[str, str]:
        """The webui's --api-auth users and passwords, empty when the API is open."""
        credentials = {}
        for pair in (shared.cmd_opts.api_auth or "").split(","):
            if ":" in pair:
                user, password = pair.split(":", 1)
                credentials[user] = password
        return credentials


RECIPE_FOLDER = "merge-lab-recipes"
TRIED = "merge_lab_tried"  # on a tried model's checkpoint info: (request, InPlaceResult)
SETTINGS_SECTION = ("merge_lab", "Merge Lab")


def on_ui_settings() -> None:
    """Merge Lab's options in the webui's Settings tab."""
    load_default = shared.OptionInfo(True, 'Tick "Load merged model now" by default', section=SETTINGS_SECTION)
    device = shared.OptionInfo(
        "", "Device to merge on (empty: the one the webui generates on; e.g. cpu, cuda:1)", section=SETTINGS_SECTION
    )
    shared.opts.add_option("merge_lab_load_default", load_default.needs_reload_ui())
    shared.opts.add_option("merge_lab_device", device.needs_reload_ui())


class XyzSession:
    """The X/Y/Z plot's Merge Lab axes over the loaded model: they vary the merge tried in it."""

    def __init__(self, host: WebuiHost):
        self.host = host

    def base(self):
        request = self.host.tried_request()
        if request is None:
            raise RequestError(
                "the loaded model is a checkpoint as loaded: Try a merge in the Merge Lab tab first; "
                "the axis varies the merge tried in the model"
            )
        return request

    def try_request(self, request) -> None:
        self.host.try_merge(request)  # inside the plot's generation: the queue lock is held already

    def family(self) -> str:
        from ..actions import family_of

        return family_of(self.host, self.base())

    def recipe_dir(self) -> Path:
        """``merge-lab-recipes`` in the checkpoint folder: the recipe axis reads recipe files there only."""
        return self.host.output_dir() / RECIPE_FOLDER


def register_callbacks(host_class: type[WebuiHost] = WebuiHost) -> None:
    """Merge Lab's tab, settings, API routes and X/Y/Z axes, over ``host_class``: the entry script
    passes the webui's host or Forge's (``hosts/forge.py``), whichever it runs in."""
    from modules import script_callbacks

    script_callbacks.on_ui_tabs(functools.partial(on_ui_tabs, host_class))
    script_callbacks.on_ui_settings(on_ui_settings)
    script_callbacks.on_app_started(functools.partial(on_app_started, host_class=host_class))
    script_callbacks.on_before_ui(functools.partial(on_before_ui, host_class))


def on_before_ui(host_class: type[WebuiHost] = WebuiHost) -> None:
    """Merge Lab's axes in the built-in X/Y/Z plot, before the plot builds its UI from its list."""
    from modules import scripts

    from ..loop.xyz_axes import add_axes, find_xyz_module

    xyz = find_xyz_module(scripts.scripts_data)
    if xyz is not None:
        add_axes(xyz, XyzSession(host_class()))


def on_ui_tabs(host_class: type[WebuiHost] = WebuiHost):
    """The tab, built over this host; the webui calls this once per UI (re)load."""
    from ..ui.tab import build_tab

    return [(build_tab(host_class(), in_webui=True), "Merge Lab", "merge_lab")]


def on_app_started(_demo, app, host_class: type[WebuiHost] = WebuiHost) -> None:
    """The API routes on the webui's own FastAPI app, behind --api-auth when the webui has it; and
    the temp files of merges that were killed (kill -9, a crash) removed from the checkpoint folder."""
    from ..api import add_routes
    from ..io.writer import remove_leftovers

    host = host_class()
    add_routes(app, host, host.api_auth() or None)
    remove_leftovers(host.output_dir())


def _checkpoint_info(name: str):
    """The webui's CheckpointInfo for a title or plain name; exact ids only, never a substring guess."""
    info = sd_models.checkpoints_list.get(name) or sd_models.checkpoint_aliases.get(name)
    if info is None:
        raise InputError(f"{name}: not in the webui's checkpoint list (press refresh, or check the name)")
    return info


def _txt2img(settings: ImageSettings):
    """A txt2img job as the txt2img tab makes one (output folders, one image)."""
    opts = shared.opts
    return processing.StableDiffusionProcessingTxt2Img(
        sd_model=shared.sd_model,
        outpath_samples=opts.outdir_samples or opts.outdir_txt2img_samples,
        outpath_grids=opts.outdir_grids or opts.outdir_txt2img_grids,
        prompt=settings.prompt,
        negative_prompt=settings.negative_prompt,
        seed=settings.seed,
        steps=settings.steps,
        width=settings.width,
        height=settings.height,
        cfg_scale=settings.cfg_scale,
        sampler_name=settings.sampler or None,
        batch_size=1,
        n_iter=1,
    )


def _forget_weight_backups(model) -> None:
    """The built-in Lora extension keeps each layer's weights from before a LoRA was applied, and
    restores them when the LoRAs change; after new weights those backups are stale. Loading a state
    dict clears them the same way (its load_state_dict hook)."""
    for module in model.modules():
        if hasattr(module, "network_current_names"):
            module.network_current_names = ()
            module.network_weights_backup = None
            module.network_bias_backup = None
