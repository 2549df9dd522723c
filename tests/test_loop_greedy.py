"""Greedy soups in the experiment loop (lib_merge.loop.runner) over tests/image_host.py's ImageHost: each
soup really merged into a torch module, images made from it, scored by a deterministic scorer."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import load
from image_host import ImageHost, sd15_module

from lib_merge import merge, merge_into
from lib_merge.errors import RequestError
from lib_merge.io.formats import open_checkpoint
from lib_merge.loop.greedy_soup import GreedyWalk
from lib_merge.loop.runner import ImageSettings, finish_walk, greedy_pair, run_greedy_soup, soup_request
from lib_merge.recipe import recipe_dict, request_from_recipe

A, B, C = "a.safetensors", "b.safetensors", "c.safetensors"
PROMPTS = ["a cat", "a lighthouse at dusk"]
SETTINGS = ImageSettings(seed=-1, width=4, height=4)
UNET = "model.diffusion_model."


@pytest.fixture
def image_host(models, tmp_path):
    return ImageHost(models, tmp_path / "grids", hash_cache=tmp_path / "hashes.json")


class DistanceScorer:
    """Scores the loaded model (the one the images came from) by minus its UNet's distance to
    ``target``; remembers each call's images and prompts, by the weights they were made with.

    With target 0.6 A + 0.4 C (A, B, C independent random models): alone, A is nearest, then C,
    then B; A + C (0.1 |A - C| away) beats A alone (0.4 |A - C|); adding B drags the soup away.
    """

    def __init__(self, host: ImageHost, target: dict[str, torch.Tensor]):
        self.host, self.target = host, target
        self.calls: list[tuple[str, list, list]] = []

    def __call__(self, images, prompts) -> float:
        self.calls.append((self.host.weights_hash(), images, prompts))
        weights = self.host.model.state_dict()
        return -math.sqrt(sum(float((weights[k].double() - t).square().sum()) for k, t in self.target.items()))


def target(models, **coefficients) -> dict[str, torch.Tensor]:
    files = {name: load(models / f"{name}.safetensors") for name in coefficients}
    keys = [k for k in files[next(iter(files))] if k.startswith(UNET)]
    return {k: sum(c * files[name][k].double() for name, c in coefficients.items()) for k in keys}


def weights_of(host: ImageHost, request) -> dict[str, torch.Tensor]:
    """What a merge straight into a fresh model gives."""
    fresh = sd15_module()
    merge_into(request, host, fresh.state_dict())
    return fresh.state_dict()


def holds(host: ImageHost, weights: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(tensor, weights[key]) for key, tensor in host.model.state_dict().items())


def test_the_soup_is_found_by_the_scorer_and_left_in_the_model(image_host, models):
    scorer = DistanceScorer(image_host, target(models, a=0.6, c=0.4))
    outcome = run_greedy_soup(image_host, [B, C, A], PROMPTS, SETTINGS, scorer, scorer_name="tests:distance")

    result = outcome.result
    assert [name for name, _ in result.ranking] == [A, C, B]
    assert [(step.candidate, step.kept) for step in result.steps] == [(C, True), (B, False)]
    assert result.ingredients == (A, C) and outcome.request == soup_request([A, C], outcome.request.provenance)
    # Every soup was scored on one image per prompt, all with one seed.
    assert [(len(images), prompts) for _, images, prompts in scorer.calls] == [(2, PROMPTS)] * 5
    assert len(image_host.generated) == 10 and outcome.seed >= 0
    # The model holds the soup found (not the last one scored, A + C + B), and the images shown are its.
    assert holds(image_host, weights_of(image_host, outcome.request))
    assert [images for state, images, _ in scorer.calls if state == image_host.weights_hash()] == [outcome.images]
    assert f"Greedy soup: {A} + {C}," in outcome.message() and f"+ {B}: " in outcome.message()


def test_the_path_is_in_the_recipe_and_saving_writes_it_into_the_file(image_host, models):
    scorer = DistanceScorer(image_host, target(models, a=0.6, c=0.4))
    outcome = run_greedy_soup(image_host, [A, B, C], PROMPTS, SETTINGS, scorer, scorer_name="tests:distance")

    recipe = recipe_dict(outcome.request)
    path = recipe["greedy_soup"]
    assert recipe["merge"] == {"method": "soup", "models": [A, C]}
    assert path == {**outcome.result.record(), "scorer": "tests:distance", "prompts": PROMPTS, "seed": outcome.seed}
    assert [step["kept"] for step in path["steps"]] == [True, False]
    assert request_from_recipe(json.loads(json.dumps(recipe))) == outcome.request  # round-trips

    saved = merge(request_from_recipe(recipe), image_host)  # what the tab's Save soup does
    with open_checkpoint(saved.path) as reader:
        written = json.loads(reader.metadata["sd_merge_recipe"])["merge_lab_recipe"]
    assert written["greedy_soup"] == path
    assert request_from_recipe(written).provenance == {"greedy_soup": path}
    file = load(saved.path)
    assert all(torch.equal(tensor, file[key]) for key, tensor in image_host.model.state_dict().items())


def test_a_single_model_that_no_soup_beats_is_loaded_whole(image_host, models):
    scorer = DistanceScorer(image_host, target(models, b=1.0))
    outcome = run_greedy_soup(image_host, [A, B, C], ["p"], SETTINGS, scorer, scorer_name="tests:distance")

    assert outcome.result.ingredients == (B,) and outcome.request is None and outcome.model == B
    assert [step.kept for step in outcome.result.steps] == [False, False]
    assert image_host.loaded == B and holds(image_host, load(models / B))
    assert f"{B} alone" in outcome.message()


@pytest.mark.parametrize("where", ["between soups", "in an image"])
def test_cancel_stops_and_leaves_a_whole_model(image_host, models, where):
    scorer = DistanceScorer(image_host, target(models, a=0.6, c=0.4))

    def press_cancel_after_four_soups(soup, images):
        if len(scorer.calls) == 3:
            image_host.press_cancel()

    if where == "in an image":
        image_host.stop_after_images = 7  # the 4th soup's second image
    outcome = run_greedy_soup(
        image_host, [A, B, C], PROMPTS, SETTINGS, scorer, scorer_name="tests:distance",
        on_step=press_cancel_after_four_soups if where == "between soups" else None,
    )  # fmt: skip

    assert outcome.cancelled and outcome.request is None and outcome.images == []
    assert "cancelled" in outcome.message()
    if where == "between soups":
        assert len(scorer.calls) == 4 and "stopped after 4 of 5 evaluations" in outcome.message()
    else:
        assert len(scorer.calls) == 3 and outcome.evaluated == 3
    # The 4th soup, A + C, was merged whole before the cancel.
    assert holds(image_host, weights_of(image_host, soup_request([A, C])))


def test_a_nan_score_is_refused_naming_the_candidate(image_host):
    with pytest.raises(RequestError, match=rf"^scorer: NaN score for candidate '{B}'"):
        run_greedy_soup(image_host, [B, A], PROMPTS, SETTINGS, lambda images, prompts: math.nan, scorer_name="t:nan")


def test_a_scorer_that_fails_is_named_with_the_soup(image_host):
    def broken(images, prompts):
        raise ValueError("no faces found")

    with pytest.raises(RequestError, match=rf"^scorer: t:broken failed on {B} \(ValueError: no faces found\)"):
        run_greedy_soup(image_host, [B, A], PROMPTS, SETTINGS, broken, scorer_name="t:broken")


def test_no_prompts_are_refused_before_anything_runs(image_host):
    with pytest.raises(RequestError, match=r"^greedy_soup\.prompts: give at least one prompt"):
        run_greedy_soup(image_host, [A, B], [], SETTINGS, lambda images, prompts: 0.0, scorer_name="t:zero")
    assert image_host.generated == []


# The user as the scorer: one pair of image sets per step, then the soup they built.


def test_each_step_shows_the_soup_beside_the_soup_with_the_candidate(image_host, models):
    settings = ImageSettings(seed=7, width=4, height=4)
    walk = GreedyWalk([A, B, C])
    soup, with_b = greedy_pair(image_host, walk, PROMPTS, settings)

    assert len(soup) == len(with_b) == 2 and soup != with_b
    a_alone = image_host.generated[0]
    assert image_host.generated[:2] == [a_alone, a_alone]  # A loaded as it is, for both prompts
    assert holds(image_host, weights_of(image_host, soup_request([A, B])))  # left on soup + candidate

    walk = walk.decide(False)
    soup_again, with_c = greedy_pair(image_host, walk, PROMPTS, settings)
    assert soup_again == soup  # A reloaded whole after the tried soup: the same images
    assert holds(image_host, weights_of(image_host, soup_request([A, C])))

    outcome = finish_walk(image_host, walk.decide(True), PROMPTS, settings)
    assert outcome.result.ingredients == (A, C) and outcome.images == with_c
    path = recipe_dict(outcome.request)["greedy_soup"]
    assert path["scorer"] == "user" and path["seed"] == 7 and path["prompts"] == PROMPTS
    assert [(step["candidate"], step["kept"]) for step in path["steps"]] == [(B, False), (C, True)]
    assert holds(image_host, weights_of(image_host, outcome.request))


def test_the_walk_refuses_steps_out_of_turn(image_host):
    walk = GreedyWalk([A, B])
    with pytest.raises(RequestError, match=r"^greedy_soup\.decide: 1 candidates are still to decide"):
        finish_walk(image_host, walk, PROMPTS, SETTINGS)
    with pytest.raises(RequestError, match=r"^greedy_soup\.decide: nothing is pending"):
        greedy_pair(image_host, walk.decide(True), PROMPTS, SETTINGS)
    assert image_host.generated == []
