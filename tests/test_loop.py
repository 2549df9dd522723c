"""The experiment loop's sweep (lib_merge.loop.runner.run_sweep) over tests/image_host.py's ImageHost:
real checkpoints on disk merged into a real torch module; images stand in for the webui's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from image_host import ImageHost, sd15_module

from lib_merge import MergeRequest, merge_into
from lib_merge.loop.runner import ImageSettings, run_sweep
from lib_merge.loop.sweep import parse_axis

SETTINGS = ImageSettings(prompt="a cat", seed=-1, width=8, height=8)


@pytest.fixture
def image_host(models, tmp_path):
    return ImageHost(models, tmp_path / "grids", hash_cache=tmp_path / "hashes.json")


def weighted(alpha=0.3) -> MergeRequest:
    return MergeRequest("a.safetensors", "b.safetensors", multiplier=alpha)


def weights_after(host, request) -> str:
    """The hash of the weights a merge straight into a fresh model gives."""
    fresh = ImageHost(host.models_dir, host.grids)
    fresh.try_merge(request)
    return fresh.weights_hash()


def test_each_point_is_merged_then_generated_with_one_seed_and_the_grid_is_saved(image_host):
    x = parse_axis("alpha", "0.2:0.6:0.2", "weighted_sum")
    outcome = run_sweep(image_host, weighted(), x, None, SETTINGS)

    assert [cell.label for cell in outcome.cells] == ["alpha 0.2", "alpha 0.4", "alpha 0.6"]
    assert not outcome.cancelled and outcome.seed >= 0
    assert all(f"Seed: {outcome.seed}," in cell.infotext for cell in outcome.cells)
    # Each image was made from exactly that point's merge.
    for cell, state in zip(outcome.cells, image_host.generated, strict=True):
        assert state == weights_after(image_host, cell.point.request)
        assert cell.recipe["merge"]["params"]["alpha"] == cell.point.x
    assert len(set(image_host.generated)) == 3
    assert outcome.grid_path.is_file() and outcome.grid.labels == (["alpha = 0.2", "alpha = 0.4", "alpha = 0.6"], [""])


def test_two_axes_make_rows_and_the_inputs_are_read_once(image_host, monkeypatch):
    from lib_merge.io import input_cache

    caches = []
    monkeypatch.setattr(input_cache.InputCache, "__enter__", lambda self: caches.append(self) or self)
    request = MergeRequest("a.safetensors", "b.safetensors", "c.safetensors", interp_method="ties")
    x = parse_axis("density", "0.5, 1", "ties")
    y = parse_axis("blocks:lambda", "IN*=0; OUT*=0", "ties")
    outcome = run_sweep(image_host, request, x, y, SETTINGS)

    assert [(c.point.column, c.point.row) for c in outcome.cells] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert outcome.grid.labels == (
        ["density = 0.5", "density = 1"],
        ["lambda blocks = IN*=0", "lambda blocks = OUT*=0"],
    )
    assert len(set(image_host.generated)) == 4
    [cache] = caches
    keys = len(sd15_module().state_dict())
    assert keys < cache.reads < 3 * keys  # A, B and C once each (B and C: merged keys only), not 4 times


def test_cancel_between_points_keeps_the_cells_done_and_a_usable_model(image_host):
    image_host.stop_after_images = 2
    x = parse_axis("alpha", "0.1, 0.2, 0.3, 0.4", "weighted_sum")
    outcome = run_sweep(image_host, weighted(), x, None, SETTINGS)

    assert outcome.cancelled and len(outcome.cells) == 2 and outcome.points == 4
    assert outcome.grid.labels[0] == ["alpha = 0.1", "alpha = 0.2"]
    assert "(cancelled)" in outcome.message()
    # The third point was merged whole before its image was stopped: that merge is what is loaded.
    assert image_host.tried[0].root().params["alpha"] == 0.3 and image_host.tried[1].name == "0.7(a) + 0.3(b)"
    assert outcome.loaded == (image_host.tried[1].name, image_host.tried[1].recipe_hash)
    # The model holds a whole merge (the last one tried), never a half-written one.
    expected = sd15_module()
    merge_into(image_host.tried[0], image_host, expected.state_dict())
    wanted = expected.state_dict()  # once: state_dict() walks the whole module
    assert all(torch.equal(t, wanted[k]) for k, t in image_host.model.state_dict().items())


def test_a_given_seed_is_used_for_every_image(image_host):
    x = parse_axis("alpha", "0.3, 0.7", "weighted_sum")
    outcome = run_sweep(image_host, weighted(), x, None, ImageSettings(prompt="p", seed=1234, width=4, height=4))
    assert outcome.seed == 1234 and all("Seed: 1234," in cell.infotext for cell in outcome.cells)


def test_the_webui_timing_script_skips_without_a_webui(tmp_path):
    """tests/measure_experiment_loop.py measures Try and sweeps in a real webui; CI has none."""
    script = Path(__file__).parent / "measure_experiment_loop.py"
    env = {k: v for k, v in os.environ.items() if k != "MERGE_LAB_WEBUI"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("skipped:"), done.stderr
