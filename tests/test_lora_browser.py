"""The tab's LoRA section in the standalone app (`python -m lib_merge.app --lora-dir`), driven in a
real headless Chromium: bake picked LoRAs into a checkpoint, extract a LoRA that the pickers list at
once, and a bad pick refused in the panel. Real files in a temp folder; the browser is Debian's chromium."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import SD15, assert_within_one_ulp, load, make
from make_lora import SD15_KOHYA, kohya_lora, low_rank_change, tuned_checkpoint
from test_app_browser import CHROMIUM, ROOT, _wait_for_announcement, choices, free_port, pick, playwright

pytestmark = pytest.mark.slow
LINEAR = next(key for key in SD15_KOHYA.values() if len(SD15[key].shape) == 2)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The app over a models folder (base, tuned = base + a rank-2 change) and a LoRA folder."""
    root = tmp_path_factory.mktemp("lora-app")
    models, loras = root / "models", root / "Lora"
    make(models / "base.safetensors", SD15, seed=1)
    change = low_rank_change(SD15[LINEAR].shape, 2, torch.Generator().manual_seed(5))
    tuned_checkpoint(models / "tuned.safetensors", models / "base.safetensors", {LINEAR: change})
    loras.mkdir()
    kohya_lora(loras / "style.safetensors", SD15_KOHYA, SD15, alpha=1.0)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "lib_merge.app", "--models", str(models), "--lora-dir", str(loras), "--port", str(port)],
        cwd=ROOT,
        env={**os.environ, "XDG_CACHE_HOME": str(root / "cache")},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_for_announcement(server)
        yield models, loras, f"http://127.0.0.1:{port}/"
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture
def page(served):
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        tab = browser.new_page(viewport={"width": 1280, "height": 1400})
        tab.goto(served[2])
        tab.wait_for_selector("#merge_lab_merge")
        tab.locator("#merge_lab_lora").get_by_text("LoRA: bake, extract, merge").click()
        yield tab
        browser.close()


def _open_tab(page, name: str) -> None:
    page.locator("#merge_lab_lora .tab-nav button", has_text=name).first.click()


def _done(page) -> str:
    done = page.locator("#merge_lab_result .merge-lab-done, #merge_lab_result .merge-lab-error")
    done.first.wait_for(timeout=120_000)
    return done.first.inner_text()


@pytest.mark.gradio_both  # the section's widgets and events under gradio 4 too (CI's second step)
def test_bake_two_picks_writes_the_checkpoint_at_the_ratio(page, served):
    models, loras, _ = served
    pick(page, "merge_lab_bake_checkpoint", "base.safetensors")
    pick(page, "merge_lab_bake_lora_0", "style.safetensors")
    ratio = page.locator("#merge_lab_bake_ratio_0 input[type=number]")
    ratio.fill("0.5")
    ratio.press("Enter")
    page.locator("#merge_lab_bake_custom_name textarea").fill("baked")
    page.locator("#merge_lab_bake_dtype input").click()
    page.locator("#merge_lab_bake_dtype ul.options li", has_text="fp32").first.click()
    page.locator("#merge_lab_bake").click()
    shown = _done(page)
    assert shown.startswith("Saved: baked.safetensors"), shown
    assert "baked.safetensors" in choices(page, "merge_lab_primary")  # every checkpoint picker lists it
    base, out, lora = (
        load(models / "base.safetensors"),
        load(models / "baked.safetensors"),
        load(loras / "style.safetensors"),
    )
    for name, key in SD15_KOHYA.items():
        up = lora[f"{name}.lora_up.weight"].double().flatten(1)
        down = lora[f"{name}.lora_down.weight"].double()
        change = (up @ down.flatten(1)).reshape(SD15[key].shape) * lora[f"{name}.alpha"].item() / len(down)
        assert_within_one_ulp(out[key], (base[key].double() + 0.5 * change).float(), key)


def test_extract_writes_into_the_lora_folder_and_the_pickers_list_it(page, served):
    _, loras, _ = served
    _open_tab(page, "Extract from two checkpoints")
    pick(page, "merge_lab_extract_base", "base.safetensors")
    pick(page, "merge_lab_extract_tuned", "tuned.safetensors")
    rank = page.locator("#merge_lab_extract_rank input[type=number]")
    rank.fill("2")
    rank.press("Enter")
    page.locator("#merge_lab_extract_name textarea").fill("from-tuned")
    page.locator("#merge_lab_extract").click()
    shown = _done(page)
    assert shown.startswith("Saved LoRA: from-tuned.safetensors"), shown
    assert (loras / "from-tuned.safetensors").is_file()
    _open_tab(page, "Bake into a checkpoint")
    assert "from-tuned.safetensors" in choices(page, "merge_lab_bake_lora_0")


def test_merging_no_lora_is_refused_in_the_panel_and_writes_nothing(page, served):
    _, loras, _ = served
    before = sorted(p.name for p in loras.iterdir())
    _open_tab(page, "Merge LoRAs")
    page.locator("#merge_lab_combine").click()
    shown = _done(page)
    assert shown.startswith("loras: a list of LoRAs"), shown
    assert sorted(p.name for p in loras.iterdir()) == before
