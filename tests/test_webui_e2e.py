"""Merge Lab inside a real AUTOMATIC1111 webui (v1.10.1), installed and used the way a user does.

Skipped unless MERGE_LAB_WEBUI names a webui folder built like ../shared/webui-offline/setup.sh builds
one (its venv beside it, random-weight rand_a / rand_b / rand_inpaint checkpoints):

    MERGE_LAB_WEBUI=/path/to/webui .venv/bin/python -m pytest -q tests/test_webui_e2e.py

It clones this repository's committed HEAD into WEBUI/extensions/merge-lab (what "Install from URL"
does), starts the webui with the kit's start.sh (MERGE_LAB_WEBUI_KIT, default ../shared/webui-offline;
port MERGE_LAB_WEBUI_PORT, default 7861), drives the page in headless chromium, and stops it again.
The merged files it makes (2 GB each) are deleted at the end. MERGE_LAB_SCREENSHOTS=DIR keeps screenshots.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from host_e2e import (
    CHROMIUM,
    SHOTS,
    Client,
    check_lora_section,
    choose_a_and_b,
    open_merge_lab,
    pick,
    recipe_of,
    set_number,
    shot,
    sweep_with_txt2img_settings,
    try_then_save_tried,
    txt2img_settings,
    wait_for_result,
    write_lora,
)

ROOT = Path(__file__).resolve().parents[1]
WEBUI = Path(os.environ["MERGE_LAB_WEBUI"]).resolve() if os.environ.get("MERGE_LAB_WEBUI") else None
KIT = Path(os.environ.get("MERGE_LAB_WEBUI_KIT", ROOT.parent / "shared" / "webui-offline"))
PORT = int(os.environ.get("MERGE_LAB_WEBUI_PORT", "7861"))
URL = f"http://127.0.0.1:{PORT}"
MERGED = "merge_lab_e2e"

if WEBUI is None:
    pytest.skip("set MERGE_LAB_WEBUI=/path/to/webui to run the real-webui check", allow_module_level=True)
playwright = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.slow


client = Client(URL)
call = client.call
pixels_and_model = client.pixels_and_model


@pytest.fixture(scope="module")
def webui():
    """The webui running with Merge Lab cloned into its extensions; stopped and tidied afterwards."""
    models = WEBUI / "models" / "Stable-diffusion"
    extension = WEBUI / "extensions" / "merge-lab"
    shutil.rmtree(extension, ignore_errors=True)
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(extension)], check=True)
    before = set(models.iterdir())
    subprocess.run(["bash", str(KIT / "start.sh"), str(WEBUI), str(PORT)], check=True)
    try:
        yield models
    finally:
        call("/sdapi/v1/options", {"sd_model_checkpoint": "rand_a.safetensors"})
        subprocess.run(["bash", str(KIT / "stop.sh"), str(WEBUI)], check=False)
        for path in set(models.iterdir()) - before:
            path.unlink()


@pytest.fixture
def page(webui):
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        tab = browser.new_page(viewport={"width": 1400, "height": 1100})
        tab.set_default_timeout(120_000)
        tab.goto(URL, wait_until="load")  # not "networkidle": offline, the page's font link never answers
        tab.wait_for_selector("#txt2img_generate")
        yield tab
        browser.close()


class ProgressWatcher(threading.Thread):
    """Polls /sdapi/v1/progress and keeps every state seen while a merge job ran."""

    def __init__(self):
        super().__init__(daemon=True)
        self.seen: list[dict] = []
        self.stop = threading.Event()

    def run(self):
        while not self.stop.wait(0.3):
            try:
                _, answer = call("/sdapi/v1/progress?skip_current_image=true")
            except OSError:
                continue  # the webui is busy or stopping; the next poll tells
            if answer["state"]["job"] == "merge-lab":
                self.seen.append({"progress": answer["progress"], **answer["state"]})


def test_the_extension_loaded_without_errors(webui):
    log = (WEBUI / "webui.log").read_text(errors="replace")
    assert not [line for line in log.splitlines() if "Error" in line and "merge" in line.lower()]
    status, models = call("/merge-lab/v1/models")
    assert status == 200
    assert {entry["name"].split(" [")[0]: entry["architecture"] for entry in models}["rand_a.safetensors"] == "SD1"


def test_merge_and_open_txt2img_then_generate_with_the_merged_model(page, webui):
    open_merge_lab(page)
    choose_a_and_b(page, MERGED)
    page.locator("#merge_lab_save_as_half input").check()
    page.wait_for_function(
        "n => document.querySelector('#merge_lab_preflight textarea').value.includes(n + '.safetensors')", arg=MERGED
    )
    assert page.locator("#merge_lab_load input").is_checked()  # "Load merged model now" is on by default
    shot(page, "webui-merge-lab-tab.png")

    watcher = ProgressWatcher()
    watcher.start()
    page.locator("#merge_lab_merge_open").click()
    # attached, not visible: "Merge & open txt2img" has switched to the txt2img tab by then
    page.locator("#merge_lab_result .merge-lab-done").last.wait_for(state="attached", timeout=900_000)
    watcher.stop.set()
    result = page.locator("#merge_lab_result").last.inner_text()
    assert f"Saved and loaded: {MERGED}.safetensors [" in result

    path = webui / f"{MERGED}.safetensors"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest in result
    # The writer's hash seeded the webui's cache: the webui never read the new file to hash it.
    assert f"Calculating sha256 for {path}" not in (WEBUI / "webui.log").read_text(errors="replace")
    # The webui's progress API saw the merge as a job with steps.
    assert watcher.seen and max(state["sampling_steps"] for state in watcher.seen) > 1000

    # Merge & open txt2img: the txt2img tab is shown, the top dropdown and the server agree.
    page.wait_for_selector("#tab_txt2img", state="visible")
    title = f"{MERGED}.safetensors [{digest[:10]}]"
    page.wait_for_function(
        "t => document.querySelector('#setting_sd_model_checkpoint input').value === t", arg=title, timeout=60_000
    )
    assert call("/sdapi/v1/options")[1]["sd_model_checkpoint"] == title
    top_choices = page.locator("#setting_sd_model_checkpoint input")
    top_choices.click()
    assert page.locator("#setting_sd_model_checkpoint ul.options li", has_text=MERGED).count() == 1
    page.keyboard.press("Escape")

    page.locator("#txt2img_prompt textarea").fill("a photo of a cat")
    set_number(page, "txt2img_width", 64)
    set_number(page, "txt2img_height", 64)
    set_number(page, "txt2img_steps", 2)
    page.locator("#txt2img_generate").click()
    page.wait_for_function(
        "n => document.querySelector('#html_info_txt2img')?.innerText.includes('Model: ' + n)", arg=MERGED,
        timeout=900_000,
    )  # fmt: skip
    info = page.locator("#html_info_txt2img").last.inner_text()
    assert f"Model hash: {digest[:10]}" in info and f"Model: {MERGED}" in info
    shot(page, "webui-txt2img-after-merge.png")


def test_cancel_stops_a_running_merge_and_leaves_no_file(page, webui):
    open_merge_lab(page)
    choose_a_and_b(page, f"{MERGED}_cancelled")
    before = sorted(p.name for p in webui.iterdir())
    page.locator("#merge_lab_merge").click()
    page.wait_for_selector("#tab_merge_lab .progressDiv")  # the webui's own progress bar, beside the result
    page.locator("#merge_lab_cancel").click()
    error = page.locator("#merge_lab_result .merge-lab-error").last
    error.wait_for(timeout=300_000)
    assert "cancel" in error.inner_text().lower()
    assert sorted(p.name for p in webui.iterdir()) == before


def test_names_stay_in_the_checkpoint_folder_and_cancel_stops_only_its_own_pages_merge(page, webui):
    """As someone who reaches a --listen webui would try: paths in names, and another page's Cancel."""
    models = {"primary_model_name": "rand_a.safetensors", "secondary_model_name": "rand_b.safetensors"}
    before = sorted(p.name for p in webui.iterdir()), sorted(p.name for p in webui.parent.iterdir())
    for change, field in (
        ({"custom_name": "../escaped"}, "custom_name"),
        ({"custom_name": "/tmp/escaped"}, "custom_name"),
        ({"secondary_model_name": str(webui / "rand_b.safetensors")}, "secondary_model_name"),
        ({"bake_in_vae": str(webui / "rand_b.safetensors")}, "bake_in_vae"),
        ({"discard_weights": r"^(a|aa|[a-z_.]|[a-z_.][a-z_.])+$"}, "discard_weights"),
    ):
        status, answer = call("/merge-lab/v1/merge", {**models, **change})
        assert 400 <= status < 500 and field in answer["detail"] and "\n" not in answer["detail"], answer
    assert call("/merge-lab/v1/cancel", {"id_task": "nobody"}) == (200, {"cancelled": False})

    other = page.context.browser.new_page()  # someone else's page on the same webui, open first
    other.goto(URL, wait_until="load")
    other.wait_for_selector("#txt2img_generate")
    open_merge_lab(other)
    open_merge_lab(page)
    choose_a_and_b(page, f"{MERGED}_not_cancelled")
    page.locator("#merge_lab_merge").click()
    page.wait_for_selector("#tab_merge_lab .progressDiv")
    other.locator("#merge_lab_cancel").click()
    other.wait_for_timeout(300)  # the Cancel event has reached the server
    assert call("/sdapi/v1/progress?skip_current_image=true")[1]["state"]["job"] == "merge-lab"  # still merging
    page.locator("#merge_lab_result .merge-lab-done").last.wait_for(state="attached", timeout=900_000)
    assert (
        f"Saved and loaded: {MERGED}_not_cancelled.safetensors" in page.locator("#merge_lab_result").last.inner_text()
    )
    other.close()
    made = sorted(p.name for p in webui.iterdir())
    assert made == sorted([*before[0], f"{MERGED}_not_cancelled.safetensors"])
    assert sorted(p.name for p in webui.parent.iterdir()) == before[1]  # nothing beside the checkpoint folder


def test_api_merges_refuses_bad_input_and_honours_the_inpainting_rule(webui):
    body = {"primary_model_name": "rand_inpaint.safetensors", "secondary_model_name": "rand_b.safetensors"}
    status, answer = call("/merge-lab/v1/merge", {**body, "custom_name": f"{MERGED}_inpaint", "multiplier": 0.5})
    assert status == 200, answer
    # like the built-in, an inpainting result gets ".inpainting" after the custom name
    assert answer["title"].startswith(f"{MERGED}_inpaint.inpainting.safetensors [") and not answer["loaded"]

    status, answer = call("/merge-lab/v1/merge", {**body, "custom_name": f"{MERGED}_inpaint"})
    assert status == 409 and "already exists" in answer["detail"]
    reverse = {"primary_model_name": "rand_a.safetensors", "secondary_model_name": "rand_inpaint.safetensors"}
    status, answer = call("/merge-lab/v1/merge", reverse)
    assert status == 409 and "inpainting" in answer["detail"].lower()
    status, answer = call(
        "/merge-lab/v1/merge", {"primary_model_name": "no-such-model", "secondary_model_name": "rand_b.safetensors"}
    )
    assert 400 <= status < 500 and "no-such-model" in json.dumps(answer)


def test_ties_with_a_block_preset_from_the_tab_and_a_soup_recipe_through_the_api(page, webui):
    open_merge_lab(page)
    page.get_by_role("radio", name="TIES", exact=True).check()
    page.wait_for_selector("#merge_lab_param_density", state="visible")
    choose_a_and_b(page, f"{MERGED}_ties")
    page.locator("#merge_lab_save_as_half input").check()
    page.locator("#merge_lab_load input").uncheck()
    page.locator("#merge_lab_blocks").get_by_text("Block weights").click()
    pick(page, "merge_lab_block_param", "lambda")
    pick(page, "merge_lab_block_preset", "ramp_in_out")
    page.wait_for_function("() => document.querySelectorAll('#merge_lab_block_chart svg rect').length === 26")
    page.wait_for_function(
        "() => document.querySelector('#merge_lab_preflight textarea').value.includes('lambda per block')"
    )
    shot(page, "webui-merge-lab-ties-blocks.png")
    page.locator("#merge_lab_merge").click()
    page.locator("#merge_lab_result .merge-lab-done").last.wait_for(timeout=900_000)
    assert f"{MERGED}_ties.safetensors" in page.locator("#merge_lab_result").last.inner_text()

    # The output carries its recipe: the tree with TIES's parameters and the preset spelled out per block.
    header = (webui / f"{MERGED}_ties.safetensors").open("rb")
    size = int.from_bytes(header.read(8), "little")
    metadata = json.loads(header.read(size))["__metadata__"]
    header.close()
    merge = json.loads(metadata["sd_merge_recipe"])["merge_lab_recipe"]["merge"]
    assert merge["method"] == "ties" and merge["params"]["density"] == 0.2
    assert [m["model"] for m in merge["models"]] == ["rand_a.safetensors", "rand_b.safetensors"]
    per_block = [float(value) for value in merge["blocks"]["lambda"].split(",")]
    assert len(per_block) == 26 and len(set(per_block)) > 2  # BASE + 25 blocks of a ramp

    status, methods = call("/merge-lab/v1/methods")
    assert status == 200 and {"ties", "dare", "soup", "slerp"} <= {m["name"] for m in methods}
    recipe = (
        "merge:\n  method: soup\n  models:\n    - model: rand_a.safetensors\n    - model: rand_b.safetensors\n"
        f"output:\n  custom_name: {MERGED}_soup\n  save_as_half: true\n"
    )
    status, answer = call("/merge-lab/v1/merge", {"recipe": recipe})
    assert status == 200, answer
    assert answer["title"].startswith(f"{MERGED}_soup.safetensors [") and not answer["loaded"]


def test_try_merges_into_the_loaded_model_and_its_images_match_the_saved_file(webui):
    image = {"prompt": "a photo of a cat", "steps": 2, "width": 64, "height": 64, "seed": 7}
    models = {"primary_model_name": "rand_a.safetensors", "secondary_model_name": "rand_b.safetensors"}
    call("/sdapi/v1/options", {"sd_model_checkpoint": "rand_a.safetensors"})
    primary = pixels_and_model(image)
    before = sorted(p.name for p in webui.iterdir())

    status, tried = call("/merge-lab/v1/try", {**models, "multiplier": 0.4})
    assert status == 200, tried
    assert sorted(p.name for p in webui.iterdir()) == before  # no file
    with_try = pixels_and_model(image)
    assert with_try[1] == f"Model hash: {tried['recipe_hash']}, Model: {tried['name']}"
    assert with_try[0] != primary[0]
    assert pixels_and_model(image) == with_try  # generating again does not reload the primary

    status, saved = call("/merge-lab/v1/merge", {**models, "multiplier": 0.4, "custom_name": f"{MERGED}_try"})
    assert status == 200, saved
    call("/sdapi/v1/options", {"sd_model_checkpoint": saved["title"]})
    assert pixels_and_model(image)[0] == with_try[0]  # the saved file gives the tried model's pixels

    call("/sdapi/v1/options", {"sd_model_checkpoint": "rand_a.safetensors"})
    assert pixels_and_model(image) == primary  # loading another checkpoint restores the webui's state


def test_a_lora_baked_at_0_8_gives_the_images_of_the_lora_at_0_8_in_the_prompt(webui):
    """``lora bake rand_a LORA:0.8 --dtype fp32`` (the webui computes in fp32 here: --no-half) and
    rand_a with ``<lora:NAME:0.8>`` in the prompt, which the webui's Lora extension applies to the
    loaded weights. The bake rounds the float64 sum once; the webui adds an fp32 change to an fp32
    weight, so single weights may differ by an fp32 rounding: the images must match within one
    level of 255 (the largest difference is printed)."""
    import numpy as np

    name = "merge_lab_e2e_lora"
    lora = write_lora(WEBUI / "models" / "Lora" / f"{name}.safetensors")
    baked = webui / f"{MERGED}_baked.safetensors"
    try:
        command = ["-m", "lib_merge", "lora", "bake", str(webui / "rand_a.safetensors"), f"{lora}:0.8"]
        subprocess.run([sys.executable, *command, "--dtype", "fp32", "-o", str(baked)], cwd=ROOT, check=True)
        assert call("/sdapi/v1/refresh-loras", {})[0] == 200
        assert call("/sdapi/v1/refresh-checkpoints", {})[0] == 200
        image = {"prompt": "a photo of a cat", "steps": 2, "width": 64, "height": 64, "seed": 7}
        call("/sdapi/v1/options", {"sd_model_checkpoint": "rand_a.safetensors"})
        plain = np.asarray(client.image_and_model(image)[0], dtype=np.int16)
        prompted = np.asarray(
            client.image_and_model({**image, "prompt": f"{image['prompt']} <lora:{name}:0.8>"})[0], dtype=np.int16
        )
        call("/sdapi/v1/options", {"sd_model_checkpoint": baked.name})
        from_bake, model = client.image_and_model(image)
        assert model.endswith(f"Model: {baked.stem}"), model
        from_bake = np.asarray(from_bake, dtype=np.int16)
        largest = int(np.abs(from_bake - prompted).max())
        print(f"baked vs <lora:{name}:0.8>: largest pixel difference {largest}, "
              f"{int((from_bake != prompted).sum())} of {from_bake.size} values differ")  # fmt: skip
        assert np.abs(prompted - plain).max() > 10  # the LoRA changes the image
        assert largest <= 1
    finally:
        lora.unlink(missing_ok=True)
        call("/sdapi/v1/options", {"sd_model_checkpoint": "rand_a.safetensors"})


def test_a_lora_extracted_from_a_known_low_rank_difference_reproduces_the_tuned_images(webui):
    """B is rand_a plus a known rank-4 change on an attention layer and the text encoder (a LoRA
    baked at 1 in fp32). ``lora extract rand_a B --rank 4`` (its full rank, no clamping, fp32) loaded
    over rand_a as ``<lora:NAME:1>`` must give B's images, within one level of 255 (the webui adds
    the LoRA's change in fp32; the largest difference is printed)."""
    import numpy as np

    attention = {
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q": (1280, 1280),
        "lora_te_text_model_encoder_layers_0_mlp_fc1": (768, 3072),
    }
    known = write_lora(webui.parent / "merge_lab_e2e_known_change.safetensors", attention)
    tuned = webui / f"{MERGED}_tuned.safetensors"
    extracted = WEBUI / "models" / "Lora" / "merge_lab_e2e_extracted.safetensors"
    lora = ["-m", "lib_merge", "lora"]
    try:
        base = str(webui / "rand_a.safetensors")
        subprocess.run([sys.executable, *lora, "bake", base, f"{known}:1", "--dtype", "fp32", "-o", str(tuned)],
                       cwd=ROOT, check=True)  # fmt: skip
        subprocess.run([sys.executable, *lora, "extract", base, str(tuned), "--rank", "4", "--clamp-quantile", "1",
                        "--dtype", "fp32", "-o", str(extracted)], cwd=ROOT, check=True)  # fmt: skip
        assert call("/sdapi/v1/refresh-loras", {})[0] == 200
        assert call("/sdapi/v1/refresh-checkpoints", {})[0] == 200
        image = {"prompt": "a photo of a cat", "steps": 2, "width": 64, "height": 64, "seed": 7}
        call("/sdapi/v1/options", {"sd_model_checkpoint": tuned.name})
        from_tuned = np.asarray(client.image_and_model(image)[0], dtype=np.int16)
        call("/sdapi/v1/options", {"sd_model_checkpoint": "rand_a.safetensors"})
        plain = np.asarray(client.image_and_model(image)[0], dtype=np.int16)
        prompt = f"{image['prompt']} <lora:{extracted.stem}:1>"
        with_lora = np.asarray(client.image_and_model({**image, "prompt": prompt})[0], dtype=np.int16)
        largest = int(np.abs(with_lora - from_tuned).max())
        print(f"rand_a + extracted LoRA vs the tuned file: largest pixel difference {largest}, "
              f"{int((with_lora != from_tuned).sum())} of {from_tuned.size} values differ")  # fmt: skip
        assert np.abs(from_tuned - plain).max() > 10  # the known change changes the image
        assert largest <= 1
    finally:
        known.unlink(missing_ok=True)
        extracted.unlink(missing_ok=True)
        call("/sdapi/v1/options", {"sd_model_checkpoint": "rand_a.safetensors"})


def test_the_lora_section_extracts_into_the_lora_cards_and_a_tried_bake_gives_the_prompt_s_images(page, webui):
    name = "merge_lab_e2e_tab_lora"
    lora = WEBUI / "models" / "Lora" / f"{name}.safetensors"
    try:
        check_lora_section(page, client, lora.parent, name)
    finally:
        lora.unlink(missing_ok=True)


def test_a_merge_saved_in_fp8_and_a_try_of_it_give_the_same_images(webui):
    image = {"prompt": "a photo of a cat", "steps": 2, "width": 64, "height": 64, "seed": 7}
    client.check_fp8_output_and_its_try(image, webui, f"{MERGED}_fp8")


def test_try_save_tried_and_a_sweep_from_the_tab_with_txt2img_settings(page, webui):
    txt2img_settings(page, 128)
    try_then_save_tried(page, webui, f"{MERGED}_tried")
    result, grid = sweep_with_txt2img_settings(page, "0.1:0.9:0.4", points=3, size=128, outputs=WEBUI / "outputs")
    assert "alpha 0.5: 0.5(rand_a) + 0.5(rand_b) [" in result
    shot(page, "webui-merge-lab-sweep.png")
    if SHOTS:
        shutil.copy(grid, Path(SHOTS) / "merge-lab-sweep-grid.png")  # the README's picture

    pick(page, "merge_lab_cell", "alpha 0.9")
    page.locator("#merge_lab_save_cell").click()
    saved = "0.1(rand_a) + 0.9(rand_b)"
    wait_for_result(page, f"Saved: {saved}")
    assert recipe_of(webui / f"{saved}.safetensors")["merge"]["params"]["alpha"] == 0.9


def test_the_xyz_plot_has_merge_lab_axes_that_vary_the_tried_merge(webui):
    for name in ("rand_b.safetensors", "rand_a.safetensors"):  # rand_a as loaded from its file
        call("/sdapi/v1/options", {"sd_model_checkpoint": name})
    client.check_xyz_axes({"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 7}, "errors")


SCORER = "def redness(images, prompts):\n    return sum(sum(p[0] for p in i.getdata()) / (i.width * i.height) for i in images) / len(images)\n"


def test_greedy_soup_in_the_tab_picked_by_the_user_then_scored_by_a_function(page, webui):
    scorer = WEBUI / "merge_lab_e2e_scorer.py"  # importable: the webui runs launch.py from its folder
    scorer.write_text(SCORER)
    try:
        open_merge_lab(page)
        page.locator("#merge_lab_sweep").get_by_text("Sweep: an X/Y grid of images").click()
        for elem_id, value in (("merge_lab_width", 64), ("merge_lab_height", 64), ("merge_lab_steps", 2)):
            set_number(page, elem_id, value)
        set_number(page, "merge_lab_seed", 7)
        page.locator("#merge_lab_greedy").get_by_text("Greedy soup").click()
        pick(page, "merge_lab_greedy_candidates", "rand_b")
        pick(page, "merge_lab_greedy_candidates", "rand_a")
        page.locator("#merge_lab_greedy_prompts textarea").fill("a cat\na dog")
        page.locator("#merge_lab_greedy_start").click()
        wait_for_result(page, "Greedy soup, step 1 of 1 (seed 7): rand_b.safetensors beside + rand_a.safetensors")
        assert page.locator("#merge_lab_greedy_soup img").count() == 2  # one image per prompt, each side
        assert page.locator("#merge_lab_greedy_candidate img").count() == 2
        shot(page, "webui-merge-lab-greedy.png")
        page.locator("#merge_lab_greedy_add").click()
        wait_for_result(page, "Greedy soup: rand_b.safetensors + rand_a.safetensors, seed 7")
        page.locator("#merge_lab_greedy_save").click()
        wait_for_result(page, "Saved: soup(rand_b, rand_a).safetensors")
        found = recipe_of(webui / "soup(rand_b, rand_a).safetensors")["greedy_soup"]
        assert found["scorer"] == "user" and found["prompts"] == ["a cat", "a dog"] and found["seed"] == 7
        assert found["steps"] == [{"candidate": "rand_a.safetensors", "score_with": None, "score_before": None,
                                   "kept": True}]  # fmt: skip

        page.locator("#merge_lab_greedy_scorer textarea").fill("merge_lab_e2e_scorer:redness")
        page.locator("#merge_lab_greedy_start").click()
        wait_for_result(page, "Ranking: ")
        report = page.locator("#merge_lab_result").last.inner_text()
        ranking = report.split("Ranking: ")[1].split("\n")[0]
        assert ranking.count(".safetensors ") == 2  # each candidate with its own score
        steps = [line for line in report.splitlines() if line.startswith("+ ")]
        assert len(steps) == 1 and " vs " in steps[0]  # the second of the ranking judged against the first
    finally:
        scorer.unlink()


def test_a_sweep_reports_progress_per_point_and_cancel_leaves_the_last_whole_merge(webui):
    models = {"primary_model_name": "rand_a.safetensors", "secondary_model_name": "rand_b.safetensors"}
    body = {**models, "x_param": "alpha", "x_values": "0.1:0.9:0.2", "prompt": "a cat", "seed": 3, "steps": 2,
            "width": 64, "height": 64}  # fmt: skip
    watcher = ProgressWatcher()
    watcher.start()
    answer: dict = {}

    def run_sweep() -> None:
        answer["status"], answer["body"] = call("/merge-lab/v1/sweep", body)

    sweep = threading.Thread(target=run_sweep)
    sweep.start()
    while not any(state["job_no"] >= 2 for state in watcher.seen) and sweep.is_alive():
        sweep.join(0.2)
    call("/sdapi/v1/interrupt", {})  # what the webui's Interrupt and the tab's Cancel do
    sweep.join()
    watcher.stop.set()
    assert answer["status"] == 200, answer
    done = answer["body"]
    assert done["cancelled"] and 2 <= len(done["cells"]) < 5
    assert {state["job_count"] for state in watcher.seen} == {5}  # the progress bar counts points
    # The webui is left on the last merge made, whole (a point whose image was cancelled, or the last
    # cell's): the next image names it.
    loaded = done["loaded"]
    assert loaded["name"] in {f"{round(1 - a, 1)}(rand_a) + {a}(rand_b)" for a in (0.1, 0.3, 0.5, 0.7, 0.9)}
    _, model = pixels_and_model({"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 3})
    assert model == f"Model hash: {loaded['recipe_hash']}, Model: {loaded['name']}"
