"""The experiment loop's sweep: for each point, merge into the loaded model, generate, then one grid.

Host-free: the host (the webui) merges in place (``try_merge``), generates (``generate``) and
draws and saves the grid (``save_grid``); this module decides the order, the fixed seed, what to
keep per cell, and when to stop. The inputs are read once per sweep (``InputCache``), so a point
costs the merge arithmetic and the image, not a disk read.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from .errors import CancelledError
from .host import AppHost
from .io.input_cache import InputCache
from .request import MergeRequest
from .sweep import SweepAxis, SweepPoint, plan_sweep, point_name

MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class ImageSettings:
    """What each image of a sweep is generated with (txt2img's fields); seed -1 draws one for the sweep."""

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    steps: int = 20
    width: int = 512
    height: int = 512
    sampler: str = ""  # empty: the host's default
    cfg_scale: float = 7.0

    def with_fixed_seed(self) -> ImageSettings:
        """Every point gets the same seed, so the images differ by the merge alone."""
        return self if self.seed >= 0 else replace(self, seed=random.randint(0, MAX_SEED))


@dataclass(frozen=True)
class Generated:
    image: Any  # a PIL image
    infotext: str


class ImageHost(AppHost, Protocol):
    """An AppHost with a loaded model to merge into and generate with: the webui."""

    def try_merge(self, request: MergeRequest, *, progress=None, should_stop=None, inputs=None):
        """Merge into the loaded model in place (``lib_merge.merge_into``); returns its InPlaceResult."""

    def generate(self, settings: ImageSettings) -> Generated:
        """One image from the loaded model, with its infotext; raises CancelledError when stopped."""

    def save_grid(self, images: list, x_labels: list[str], y_labels: list[str], settings, info: str):
        """The grid (row-major, len(x_labels) columns, the last row maybe short), annotated with the
        labels, and where it was saved (None when the host's settings say not to save grids)."""


@dataclass
class Cell:
    """One point of the sweep as generated: its merge (name, recipe and hash), image and infotext."""

    point: SweepPoint
    name: str
    recipe: dict
    recipe_hash: str
    image: Any
    infotext: str

    @property
    def label(self) -> str:
        return point_name(self.point)


@dataclass
class SweepOutcome:
    cells: list[Cell]
    points: int
    grid: Any = None
    grid_path: Path | None = None
    seed: int = -1
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def cancelled(self) -> bool:
        return len(self.cells) < self.points

    def message(self) -> str:
        done = f"{len(self.cells)} of {self.points} points" if self.cancelled else f"{self.points} points"
        lines = [f"Sweep: {done}, seed {self.seed}, {self.seconds:.1f} s" + (" (cancelled)" if self.cancelled else "")]
        if self.grid_path is not None:
            lines.append(f"Grid: {self.grid_path}")
        lines += [f"{cell.label}: {cell.name} [{cell.recipe_hash}]" for cell in self.cells]
        return "\n".join(lines + self.notes)


def run_sweep(
    host: ImageHost,
    request: MergeRequest,
    x: SweepAxis,
    y: SweepAxis | None,
    settings: ImageSettings,
    *,
    task_id: str = "",
    on_cell: Callable[[Cell], None] | None = None,
) -> SweepOutcome:
    """Merge and generate every point as one host job; Cancel stops between points (and in an image).

    The loaded model is left on the last point merged whole, so the webui stays usable; the grid
    holds the points done.
    """
    started = time.perf_counter()
    points = plan_sweep(request, x, y)
    settings = settings.with_fixed_seed()
    outcome = SweepOutcome([], len(points), seed=settings.seed)
    with host.job(task_id, jobs=len(points)), InputCache(host.device()) as inputs:
        for point in points:
            if host.should_stop():
                break
            try:
                tried = host.try_merge(point.request, should_stop=host.should_stop, inputs=inputs)
                generated = host.generate(settings)
            except CancelledError:
                break
            cell = Cell(point, tried.name, tried.recipe, tried.recipe_hash, generated.image, generated.infotext)
            outcome.cells.append(cell)
            if on_cell is not None:
                on_cell(cell)
        if outcome.cells:
            _save_grid(host, outcome, x, y, settings)
    outcome.seconds = time.perf_counter() - started
    return outcome


def _save_grid(host: ImageHost, outcome: SweepOutcome, x: SweepAxis, y: SweepAxis | None, settings) -> None:
    """The grid of the cells done: all columns once a second row started, the rows begun."""
    cells = outcome.cells
    columns = len(x.values) if len(cells) > len(x.values) else len(cells)
    rows = list(dict.fromkeys(cell.point.label_y for cell in cells))
    info = f"{cells[0].infotext}\nMerge Lab sweep: {x.param}" + (f" x {y.param}" if y else "")
    x_labels = [x.label(value) for value in x.values[:columns]]
    outcome.grid, outcome.grid_path = host.save_grid([cell.image for cell in cells], x_labels, rows, settings, info)
