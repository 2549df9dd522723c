"""ImageHost: a FolderHost with a loaded model to merge into and "generate" with, for tests of the
experiment loop (lib_merge.loop.runner) without a webui.

It stands in for WebuiHost, whose loaded model and image generation need the real webui (run by
tests/test_webui_e2e.py when MERGE_LAB_WEBUI is set). The model is a torch module with a tensor
at every SD1.5 key (tests/conftest.py's small shapes); loading copies a checkpoint into it, a try
merges into it in place with the engine's merge_into, and an "image" is a flat colour drawn from a
hash of the weights and the seed, so two images are equal exactly when weights and seed are.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import torch
from conftest import SD15
from PIL import Image

from lib_merge import FolderHost, merge_into
from lib_merge.errors import CancelledError
from lib_merge.io.formats import open_checkpoint
from lib_merge.loop.runner import Generated


def sd15_module(dtype=torch.float16, without=()) -> torch.nn.Module:
    """A module tree with a parameter at every SD1.5 key (VAE in float32, as the webui keeps it)."""
    root = torch.nn.Module()
    for key, spec in SD15.items():
        if key in without:
            continue
        *path, leaf = key.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        kind = torch.float32 if key.startswith("first_stage_model.") else dtype
        module.register_parameter(leaf, torch.nn.Parameter(torch.zeros(spec.shape, dtype=kind), requires_grad=False))
    return root


class ImageHost(FolderHost):
    def __init__(self, models: Path, grids: Path, **options):
        super().__init__(models, device="cpu", **options)
        self.model = sd15_module()
        self.loaded = ""  # the checkpoint loaded as it is, or "" while a merge is tried in the model
        self.tried = None  # (request, result) of the merge in the model
        self.grids = grids
        self.generated: list[str] = []  # the model state (its hash) of each image, in order
        self.stop_after_images: int | None = None  # Cancel pressed once this many images are done

    @contextlib.contextmanager
    def job(self, task_id: str = "", jobs: int = 1, owner: str = ""):
        """The host's job, remembering its owner so the stand-in's Cancel (``press_cancel``) is that
        owner's, as the tab's Cancel is its page's."""
        self.owner = owner or "test-page"
        with super().job(task_id, jobs, self.owner):
            yield

    def press_cancel(self) -> None:
        assert self.interrupt(self.owner), "Cancel found no job of its owner running"

    def load(self, name: str) -> str:
        with open_checkpoint(self.resolve(name).path) as reader:
            for key, tensor in self.model.state_dict().items():
                tensor.copy_(reader[key])
        self.loaded, self.tried = name, None
        return name

    def try_merge(self, request, *, progress=None, should_stop=None, inputs=None):
        if self.tried is not None and self.tried[0] == request:
            return self.tried[1]
        primary = next(request.root().models()).name
        if self.loaded != primary and (self.tried is None or next(self.tried[0].root().models()).name != primary):
            self.load(primary)
        result = merge_into(
            request, self, self.model.state_dict(), progress=progress, should_stop=should_stop, inputs=inputs
        )
        self.loaded, self.tried = "", (request, result)
        return result

    def weights_hash(self) -> str:
        digest = hashlib.sha256()
        for tensor in self.model.state_dict().values():
            digest.update(tensor.numpy().tobytes())
        return digest.hexdigest()[:10]

    def generate(self, settings) -> Generated:
        if self.stop_after_images is not None and len(self.generated) >= self.stop_after_images:
            self.press_cancel()
            raise CancelledError("cancelled while generating")
        state = self.weights_hash()
        self.generated.append(state)
        color = tuple(hashlib.sha256(f"{state} {settings.seed} {settings.prompt}".encode()).digest()[:3])
        name = self.tried[1].name if self.tried else self.loaded
        infotext = f"{settings.prompt}\nSeed: {settings.seed}, Model: {name}, Weights: {state}"
        return Generated(Image.new("RGB", (settings.width, settings.height), color), infotext)

    def save_grid(self, images, x_labels, y_labels, settings, info):
        width, height = images[0].size
        grid = Image.new("RGB", (width * len(x_labels), height * len(y_labels)), "white")
        for index, image in enumerate(images):
            grid.paste(image, (index % len(x_labels) * width, index // len(x_labels) * height))
        grid.labels = (list(x_labels), list(y_labels))  # for the tests to read
        self.grids.mkdir(parents=True, exist_ok=True)
        path = self.grids / f"grid-{len(list(self.grids.iterdir())):03d}.png"
        grid.save(path)
        return grid, path
