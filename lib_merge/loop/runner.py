"""The experiment loop: sweeps (for each point, merge into the loaded model, generate, then one
grid) and greedy soups (each soup tried in the loaded model, one image per prompt, then scored).

Host-free: the host (the webui) merges in place (``try_merge``), generates (``generate``) and
draws and saves the grid (``save_grid``); this module decides the order, the fixed seed, what to
keep per cell, and when to stop. The inputs are read once per sweep (``InputCache``), so a point
costs the merge arithmetic and the image, not a disk read.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from ..errors import CancelledError, MergeError, RequestError, brief, shown
from ..hosts import AppHost
from ..io.input_cache import InputCache
from ..request import MergeRequest
from .greedy_soup import USER, GreedySoupResult, GreedyWalk, greedy_soup, soup_node
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

    def __post_init__(self):
        """txt2img's own ranges: a request cannot ask for hour-long images (work per request is bounded)."""
        for name, low, high in (("seed", -1, MAX_SEED), ("steps", 1, 150), ("width", 1, 2048), ("height", 1, 2048)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise RequestError(f"sweep.{name}: expected a whole number from {low} to {high}, got {shown(value)}")
        try:
            cfg_scale = float(self.cfg_scale)
        except (TypeError, ValueError, OverflowError):
            cfg_scale = math.nan
        if isinstance(self.cfg_scale, bool) or not 1.0 <= cfg_scale <= 30.0:
            raise RequestError(f"sweep.cfg_scale: expected a number from 1 to 30, got {shown(self.cfg_scale)}")
        object.__setattr__(self, "cfg_scale", cfg_scale)
        for name in ("prompt", "negative_prompt", "sampler"):
            if not isinstance(getattr(self, name), str):
                raise RequestError(f"sweep.{name}: expected text")

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
    loaded: tuple[str, str] = ("", "")  # (name, recipe hash) of the merge left in the model

    @property
    def cancelled(self) -> bool:
        return len(self.cells) < self.points

    def message(self) -> str:
        done = f"{len(self.cells)} of {self.points} points" if self.cancelled else f"{self.points} points"
        lines = [f"Sweep: {done}, seed {self.seed}, {self.seconds:.1f} s" + (" (cancelled)" if self.cancelled else "")]
        if self.grid_path is not None:
            lines.append(f"Grid: {self.grid_path}")
        lines += [f"{cell.label}: {cell.name} [{cell.recipe_hash}]" for cell in self.cells]
        if self.cancelled and self.loaded[0]:
            lines.append(f"Loaded now: {self.loaded[0]} [{self.loaded[1]}]")
        return "\n".join(lines + self.notes)


def run_sweep(
    host: ImageHost,
    request: MergeRequest,
    x: SweepAxis,
    y: SweepAxis | None,
    settings: ImageSettings,
    *,
    task_id: str = "",
    owner: str = "",
    on_cell: Callable[[Cell], None] | None = None,
) -> SweepOutcome:
    """Merge and generate every point as one host job; Cancel stops between points or in an image.

    A merge under way is finished first (seconds), so the model is always left holding a whole
    merge, the last one made (``outcome.loaded``: after a Cancel in an image, a point without a
    cell), and the webui stays usable. The grid holds the points done.
    """
    started = time.perf_counter()
    points = plan_sweep(request, x, y)
    settings = settings.with_fixed_seed()
    outcome = SweepOutcome([], len(points), seed=settings.seed)
    with host.job(task_id, jobs=len(points), owner=owner), InputCache(host.device()) as inputs:
        for point in points:
            if host.should_stop():
                break
            try:
                tried = host.try_merge(point.request, inputs=inputs)
                outcome.loaded = (tried.name, tried.recipe_hash)
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


# Greedy soup (lib_merge.greedy_soup) with images: a soup of 2+ models is tried in the loaded model,
# a single model is loaded as it is; each then gives one image per prompt, all with one seed.


@dataclass
class GreedyOutcome:
    """A greedy soup as found: the path (``result``; None when cancelled), the request that saves
    the soup with the path in its recipe (None for a single model: the file exists), and the final
    soup's images, one per prompt."""

    result: GreedySoupResult | None
    request: MergeRequest | None
    images: list
    seed: int
    seconds: float = 0.0
    evaluated: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def cancelled(self) -> bool:
        return self.result is None

    @property
    def model(self) -> str:
        """The single model that no soup beat, or "" when the result is a soup."""
        return self.result.ingredients[0] if self.result and self.request is None else ""

    def message(self) -> str:
        if self.result is None:
            return "\n".join([f"Greedy soup cancelled after {self.evaluated} soups, {self.seconds:.1f} s", *self.notes])
        result = self.result
        found = " + ".join(result.ingredients) if self.request else f"{self.model} alone (its file is the soup)"
        lines = [f"Greedy soup: {found}, seed {self.seed}, {self.seconds:.1f} s"]
        lines.append("Ranking: " + ", ".join(name + _score_text(score) for name, score in result.ranking))
        for step in result.steps:
            verdict = "added" if step.kept else "left out"
            if step.score_with is None:
                lines.append(f"+ {step.candidate}: {verdict} (your pick)")
            else:
                lines.append(f"+ {step.candidate}: {step.score_with:.4g} vs {step.score_before:.4g}, {verdict}")
        return "\n".join(lines + self.notes)


def _score_text(score: float | None) -> str:
    return "" if score is None else f" {score:.4g}"


def soup_request(names, provenance: dict | None = None) -> MergeRequest:
    """The uniform soup of ``names`` as a request; ``provenance`` goes into its recipe."""
    return MergeRequest(names[0], tree=soup_node(names), provenance=provenance)


def greedy_provenance(record: dict, scorer: str, prompts: list[str], seed: int) -> dict:
    """MergeRequest.provenance for a greedy soup: the path, who scored it and on which images."""
    return {"greedy_soup": {**record, "scorer": scorer, "prompts": list(prompts), "seed": seed}}


def run_greedy_soup(
    host: ImageHost,
    candidates: list[str],
    prompts: list[str],
    settings: ImageSettings,
    scorer: Callable,
    *,
    scorer_name: str,
    task_id: str = "",
    owner: str = "",
    on_step: Callable[[tuple[str, ...], list], None] | None = None,
) -> GreedyOutcome:
    """Greedy soup scored by ``scorer(images, prompts) -> float`` as one host job (inputs read once).

    Cancel stops between soups (or in an image, or in a merge, which the host then undoes); the
    loaded model is then the last soup tried, whole. Otherwise it is left on the soup found,
    tried with the request that carries the path, so "Save tried" saves that path too.
    """
    started = time.perf_counter()
    prompts = _prompts(prompts)
    settings = settings.with_fixed_seed()
    images: dict[tuple[str, ...], list] = {}

    def score_of(soup: tuple[str, ...]) -> float:
        _put_on(host, soup, inputs)
        images[soup] = _images(host, prompts, settings)
        if on_step is not None:
            on_step(soup, images[soup])
        try:
            return scorer(images[soup], list(prompts))
        except MergeError:
            raise
        except BaseException as err:  # the user's code: even its sys.exit() must not end the server
            raise RequestError(f"scorer: {scorer_name} failed on {' + '.join(soup)} ({brief(err)})") from err

    jobs = (2 * len(candidates) - 1) * len(prompts)
    with host.job(task_id, jobs=jobs, owner=owner), InputCache(host.device()) as inputs:
        try:
            result = greedy_soup(candidates, score_of, should_stop=host.should_stop)
        except CancelledError as err:
            return GreedyOutcome(None, None, [], settings.seed, time.perf_counter() - started, len(images), [str(err)])
        provenance = greedy_provenance(result.record(), scorer_name, prompts, settings.seed)
        request = _settle(host, result, provenance, inputs)
    seconds = time.perf_counter() - started
    return GreedyOutcome(result, request, images[result.ingredients], settings.seed, seconds, len(images))


def greedy_pair(
    host: ImageHost,
    walk: GreedyWalk,
    prompts: list[str],
    settings: ImageSettings,
    *,
    task_id: str = "",
    owner: str = "",
) -> tuple[list, list]:
    """The images the user compares at the walk's pending step, one per prompt: the soup's, then the
    soup + candidate's (left in the model), as one host job. ``settings.seed`` should be fixed for
    the whole walk (``with_fixed_seed`` once, at its start), so each step differs by the merge alone."""
    pair = walk.pending()
    if pair is None:
        raise RequestError("greedy_soup.decide: nothing is pending, every candidate is decided")
    prompts = _prompts(prompts)
    settings = settings.with_fixed_seed()
    shown = []
    with host.job(task_id, jobs=2 * len(prompts), owner=owner), InputCache(host.device()) as inputs:
        for soup in pair:
            _put_on(host, soup, inputs)
            shown.append(_images(host, prompts, settings))
    return shown[0], shown[1]


def finish_walk(
    host: ImageHost,
    walk: GreedyWalk,
    prompts: list[str],
    settings: ImageSettings,
    *,
    task_id: str = "",
    owner: str = "",
) -> GreedyOutcome:
    """The user's soup once every candidate is decided: left in the model (tried with the request
    that carries the path, ``"scorer": "user"``; a single model loaded whole) and its images."""
    if not walk.done:
        left = len(walk.candidates) - 1 - len(walk.decisions)
        raise RequestError(f"greedy_soup.decide: {left} candidates are still to decide")
    started = time.perf_counter()
    prompts = _prompts(prompts)
    result = walk.result()
    provenance = greedy_provenance(walk.record(), USER, prompts, settings.seed)
    with host.job(task_id, jobs=len(prompts), owner=owner), InputCache(host.device()) as inputs:
        request = _settle(host, result, provenance, inputs)
        images = _images(host, prompts, settings)
    return GreedyOutcome(result, request, images, settings.seed, time.perf_counter() - started)


def _prompts(prompts: list[str]) -> list[str]:
    if isinstance(prompts, str):
        raise RequestError(f"greedy_soup.prompts: expected a list of prompts, got the string {prompts!r}")
    prompts = [str(prompt) for prompt in prompts]
    if not prompts:
        raise RequestError("greedy_soup.prompts: give at least one prompt")
    return prompts


def _put_on(host: ImageHost, soup: tuple[str, ...], inputs: InputCache) -> None:
    """Make the loaded model ``soup``: one model loaded as it is, or the uniform soup tried in it."""
    if len(soup) == 1:
        host.load(soup[0])
    else:
        host.try_merge(soup_request(soup), should_stop=host.should_stop, inputs=inputs)


def _settle(host: ImageHost, result: GreedySoupResult, provenance: dict, inputs: InputCache) -> MergeRequest | None:
    """Leave the model on the result: its soup tried with ``provenance`` (returned), or its one model.

    Not cancellable: the path is found, and this is one merge that leaves a whole soup.
    """
    if len(result.ingredients) == 1:
        host.load(result.ingredients[0])
        return None
    request = soup_request(result.ingredients, provenance)
    host.try_merge(request, inputs=inputs)
    return request


def _images(host: ImageHost, prompts: list[str], settings: ImageSettings) -> list:
    """One image per prompt from the loaded model, every one with ``settings``' seed."""
    return [host.generate(replace(settings, prompt=prompt)).image for prompt in prompts]
