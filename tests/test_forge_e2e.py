"""Merge Lab inside a real Stable Diffusion WebUI Forge, installed and used the way a user does.

Skipped unless MERGE_LAB_FORGE names a Forge folder built like ../shared/forge-offline/setup.sh builds
one (its venv beside it, random-weight rand_a / rand_b / rand_inpaint checkpoints):

    MERGE_LAB_FORGE=/path/to/forge/webui .venv/bin/python -m pytest -q tests/test_forge_e2e.py

It clones this repository's committed HEAD into FORGE/extensions/merge-lab (what "Install from URL"
does), starts Forge with the kit's start.sh (MERGE_LAB_FORGE_KIT, default ../shared/forge-offline;
port MERGE_LAB_FORGE_PORT, default 7871) and ``--api-auth``, drives the page (gradio 4) in headless
chromium, and stops it again. For the SDXL test it makes two random-weight SDXL checkpoints beside the
kit's (merge_lab_xl_a / _b, 6.9 GB each) with tests/make_sdxl_checkpoint.py. The files it makes are
deleted at the end.
MERGE_LAB_SCREENSHOTS=DIR keeps screenshots.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from host_e2e import (
    CHROMIUM,
    Client,
    check_lora_section,
    pick,
    set_number,
    shot,
    sweep_with_txt2img_settings,
    try_then_save_tried,
    txt2img_settings,
    wait_for_result,
    write_lora,
)

ROOT = Path(__file__).resolve().parents[1]
FORGE = Path(os.environ["MERGE_LAB_FORGE"]).resolve() if os.environ.get("MERGE_LAB_FORGE") else None
KIT = Path(os.environ.get("MERGE_LAB_FORGE_KIT", ROOT.parent / "shared" / "forge-offline"))
PORT = int(os.environ.get("MERGE_LAB_FORGE_PORT", "7871"))
URL = f"http://127.0.0.1:{PORT}"
API_AUTH = "merge:lab-2026"  # ASCII: FastAPI 0.104 (Forge's own routes) decodes basic auth as ASCII
MERGED = "merge_lab_forge_e2e"
IMAGE = {"prompt": "a photo of a cat", "steps": 2, "width": 64, "height": 64, "seed": 7, "sampler_name": "Euler"}
A_AND_B = {"primary_model_name": "rand_a.safetensors", "secondary_model_name": "rand_b.safetensors"}
SDXL_INPUTS = {"merge_lab_xl_a.safetensors": 11, "merge_lab_xl_b.safetensors": 12}
LORA = "merge_lab_e2e_lora"
GGUF_UNET = "merge_lab_e2e_unet.gguf"

if FORGE is None:
    pytest.skip("set MERGE_LAB_FORGE=/path/to/forge/webui to run the real-Forge check", allow_module_level=True)
playwright = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.slow

forge_api = Client(URL, API_AUTH)
call = forge_api.call


def write_gguf_unet_and_its_modules(models: Path) -> list[Path]:
    """rand_a as people load GGUF files in Forge: its UNet alone, Q8_0, in a .gguf (made by
    tests/make_gguf_checkpoint.py), its VAE and text encoder in files of Forge's VAE and
    text_encoder folders, for its "VAE / Text Encoder" list. Returns those two module files."""
    import safetensors.torch

    subprocess.run([sys.executable, str(ROOT / "tests" / "make_gguf_checkpoint.py"), str(models / "rand_a.safetensors"),
                    str(models / GGUF_UNET), "--only", "model.diffusion_model."], check=True)  # fmt: skip
    tensors = safetensors.torch.load_file(str(models / "rand_a.safetensors"))
    modules = []
    for folder, prefix in (("VAE", "first_stage_model."), ("text_encoder", "cond_stage_model.")):
        path = FORGE / "models" / folder / f"merge_lab_e2e_{folder.lower()}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        safetensors.torch.save_file({k: v for k, v in tensors.items() if k.startswith(prefix)}, str(path))
        modules.append(path)
    return modules


def start_forge(**environment: str) -> None:
    subprocess.run(["bash", str(KIT / "start.sh"), str(FORGE), str(PORT), "--api-auth", API_AUTH],
                   env={**os.environ, **environment}, check=True)  # fmt: skip


@pytest.fixture(scope="module")
def forge():
    """Forge running with Merge Lab cloned into its extensions; stopped and tidied afterwards."""
    models = FORGE / "models" / "Stable-diffusion"
    extension = FORGE / "extensions" / "merge-lab"
    shutil.rmtree(extension, ignore_errors=True)
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(extension)], check=True)
    before = set(models.iterdir())
    lora = write_lora(FORGE / "models" / "Lora" / f"{LORA}.safetensors")
    gguf_modules = write_gguf_unet_and_its_modules(models)  # Forge lists modules when it starts
    start_forge()
    try:
        yield models
    finally:
        lora.unlink()
        for path in gguf_modules:
            path.unlink()
        with contextlib.suppress(OSError):  # Forge may have died (its log says why)
            call("/sdapi/v1/options", {"sd_model_checkpoint": "rand_a.safetensors"})
        subprocess.run(["bash", str(KIT / "stop.sh"), str(FORGE)], check=False)
        for path in set(models.iterdir()) - before:
            path.unlink()


@pytest.fixture
def page(forge):
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        tab = browser.new_page(viewport={"width": 1400, "height": 1100})
        tab.set_default_timeout(120_000)
        tab.goto(URL, wait_until="load")
        tab.wait_for_selector("#txt2img_generate")
        yield tab
        browser.close()


def top_checkpoint(page) -> str:
    """What Forge's own Checkpoint dropdown (no elem_id: ``.model_selection``) shows."""
    return page.locator(".model_selection input").input_value()


def test_the_extension_loaded_and_its_api_wants_forges_api_auth(forge):
    log = (FORGE / "webui.log").read_text(errors="replace")
    assert not [line for line in log.splitlines() if "Error" in line and "merge" in line.lower()]
    status, models = call("/merge-lab/v1/models")
    assert status == 200
    assert {"rand_a.safetensors", "rand_b.safetensors"} <= {m["name"] for m in models}
    assert call("/merge-lab/v1/models", auth=False)[0] == 401


def test_merge_in_the_tab_loads_it_now_shows_it_in_forges_dropdown_and_names_it_in_the_infotext(page, forge):
    page.locator("#tabs > .tab-nav button", has_text="Merge Lab").click()
    pick(page, "merge_lab_primary", "rand_a")
    pick(page, "merge_lab_secondary", "rand_b")
    page.locator("#merge_lab_custom_name textarea").fill(MERGED)
    page.locator("#merge_lab_save_as_half input").check()
    page.wait_for_function(
        "n => document.querySelector('#merge_lab_preflight textarea').value.includes(n + '.safetensors')", arg=MERGED
    )
    assert page.locator("#merge_lab_load input").is_checked()
    shot(page, "forge-merge-lab-tab.png")
    page.locator("#merge_lab_merge").click()
    page.locator("#merge_lab_result .merge-lab-done").last.wait_for(state="attached", timeout=900_000)
    result = page.locator("#merge_lab_result").last.inner_text()
    assert f"Saved and loaded: {MERGED}.safetensors" in result

    path = forge / f"{MERGED}.safetensors"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert f"Calculating sha256 for {path}" not in (FORGE / "webui.log").read_text(errors="replace")
    # Loaded now, not at the next generation: Forge's own log says so before any image is made.
    assert f"'filename': '{path}'" in (FORGE / "webui.log").read_text(errors="replace").split("Loading Model:")[-1]
    page.wait_for_function(
        "n => document.querySelector('.model_selection input').value === n", arg=f"{MERGED}.safetensors",
        timeout=60_000,
    )  # fmt: skip
    assert call("/sdapi/v1/options")[1]["sd_model_checkpoint"] == f"{MERGED}.safetensors"
    shot(page, "forge-merge-lab-merged.png")

    page.locator("#tabs > .tab-nav button", has_text="Txt2img").click()
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
    assert top_checkpoint(page) == f"{MERGED}.safetensors"
    shot(page, "forge-txt2img-after-merge.png")


def test_try_images_match_the_saved_files_and_restore_goes_back_to_the_file(forge):
    call("/sdapi/v1/options", {"sd_model_checkpoint": "rand_a.safetensors"})
    primary = forge_api.pixels_and_model(IMAGE)
    before = sorted(p.name for p in forge.iterdir())

    status, tried = call("/merge-lab/v1/try", {**A_AND_B, "multiplier": 0.4, "save_as_half": True})
    assert status == 200, tried
    assert sorted(p.name for p in forge.iterdir()) == before  # no file
    with_try = forge_api.pixels_and_model(IMAGE)
    assert with_try[1] == f"Model hash: {tried['recipe_hash']}, Model: {tried['name']}"
    assert with_try[0] != primary[0]
    assert forge_api.pixels_and_model(IMAGE) == with_try  # generating again does not reload the primary

    status, saved = call("/merge-lab/v1/merge", {**A_AND_B, "multiplier": 0.4, "save_as_half": True,
                                                  "custom_name": f"{MERGED}_try", "load": True})  # fmt: skip
    assert status == 200 and saved["loaded"], saved
    from_file = forge_api.pixels_and_model(IMAGE)
    assert from_file[0] == with_try[0]  # pixel-identical: the tried weights are the file's
    assert from_file[1].endswith(f"Model: {MERGED}_try")

    call("/sdapi/v1/options", {"sd_model_checkpoint": "rand_a.safetensors"})
    assert forge_api.pixels_and_model(IMAGE) == primary  # back to the plain file


def test_a_merge_saved_in_fp8_and_a_try_of_it_give_the_same_images(forge):
    """Forge keeps a checkpoint stored in fp8 in fp8 (and computes in fp32 here); the Try, over
    rand_a held in fp32, holds the same fp8 values: the images agree."""
    forge_api.check_fp8_output_and_its_try(IMAGE, forge, f"{MERGED}_fp8")


def test_a_sweep_through_the_api_makes_one_image_per_point_and_a_grid(forge):
    image = {key: IMAGE[key] for key in ("prompt", "steps", "width", "height", "seed")}
    status, answer = call("/merge-lab/v1/sweep", {**A_AND_B, "x_param": "alpha", "x_values": "0.2, 0.8", **image})
    assert status == 200, answer
    assert [cell["label"] for cell in answer["cells"]] == ["alpha 0.2", "alpha 0.8"]
    for cell in answer["cells"]:
        assert f"Model hash: {cell['recipe_hash']}" in cell["infotext"] and f"Model: {cell['name']}" in cell["infotext"]
    assert answer["grid"] and Path(answer["grid"]).is_file()


def test_try_save_tried_a_sweep_and_a_greedy_soup_from_the_tab(page, forge):
    txt2img_settings(page, 64)
    try_then_save_tried(page, forge, f"{MERGED}_tried")
    sweep_with_txt2img_settings(page, "0.1, 0.9", points=2, size=64, outputs=FORGE / "outputs")
    shot(page, "forge-merge-lab-sweep.png")

    set_number(page, "merge_lab_seed", 7)
    page.locator("#merge_lab_greedy").get_by_text("Greedy soup").click()
    pick(page, "merge_lab_greedy_candidates", "rand_b")
    pick(page, "merge_lab_greedy_candidates", "rand_a")
    page.locator("#merge_lab_greedy_prompts textarea").fill("a cat")
    page.locator("#merge_lab_greedy_start").click()
    wait_for_result(page, "Greedy soup, step 1 of 1 (seed 7): rand_b.safetensors beside + rand_a.safetensors")
    assert page.locator("#merge_lab_greedy_soup img").count() == 1
    assert page.locator("#merge_lab_greedy_candidate img").count() == 1
    page.locator("#merge_lab_greedy_add").click()
    wait_for_result(page, "Greedy soup: rand_b.safetensors + rand_a.safetensors, seed 7")
    shot(page, "forge-merge-lab-greedy.png")


def test_the_xyz_plot_has_merge_lab_axes_that_vary_the_tried_merge(forge):
    # A checkpoint no test tried a merge on, loaded from its file (Forge loads at the next image).
    call("/sdapi/v1/options", {"sd_model_checkpoint": "rand_inpaint.safetensors"})
    forge_api.pixels_and_model(IMAGE)
    forge_api.check_xyz_axes(IMAGE, "message")  # Forge's API puts an exception's text under "message"


def test_a_lora_in_the_prompt_patches_a_tried_merge_as_it_patches_the_saved_file(forge):
    """Forge's LoRA loader keeps the weights from before a LoRA and puts them back when the LoRAs
    change: a Try after an image made with a LoRA must leave neither the old merge nor the LoRA behind."""
    with_lora = {**IMAGE, "prompt": f"a photo of a cat <lora:{LORA}:1>"}
    assert call("/merge-lab/v1/try", {**A_AND_B, "multiplier": 0.3})[0] == 200
    first = forge_api.pixels_and_model(with_lora)
    assert call("/merge-lab/v1/try", {**A_AND_B, "multiplier": 0.7})[0] == 200  # over a LoRA-patched model
    tried = forge_api.pixels_and_model(with_lora)
    assert forge_api.pixels_and_model(IMAGE)[0] != tried[0]  # the LoRA changes the image
    status, saved = call("/merge-lab/v1/merge", {**A_AND_B, "multiplier": 0.7, "custom_name": f"{MERGED}_lora",
                                                  "load": True})  # fmt: skip
    assert status == 200 and saved["loaded"], saved
    from_file = forge_api.pixels_and_model(with_lora)
    assert from_file[0] == tried[0] != first[0]


def test_the_lora_section_extracts_into_the_lora_cards_and_a_tried_bake_gives_the_prompt_s_images(page, forge):
    name = "merge_lab_forge_e2e_tab_lora"
    lora = FORGE / "models" / "Lora" / f"{name}.safetensors"
    try:
        check_lora_section(page, forge_api, lora.parent, name)
    finally:
        lora.unlink(missing_ok=True)


def test_cancel_through_the_api_stops_only_its_own_merge_and_leaves_no_file(forge):
    task = f"merge-lab-{uuid.uuid4()}"
    body = {**A_AND_B, "multiplier": 0.5, "custom_name": f"{MERGED}_cancelled", "id_task": task}
    answer = {}

    def run_merge() -> None:
        answer["status"], answer["body"] = call("/merge-lab/v1/merge", body)

    merge = threading.Thread(target=run_merge)
    before = sorted(p.name for p in forge.iterdir())
    merge.start()
    while merge.is_alive() and call("/sdapi/v1/progress?skip_current_image=true")[1]["state"]["job"] != "merge-lab":
        time.sleep(0.1)
    assert call("/merge-lab/v1/cancel", {"id_task": "merge-lab-someone-else"})[1] == {"cancelled": False}
    assert call("/merge-lab/v1/cancel", {"id_task": task})[1] == {"cancelled": True}
    merge.join()
    assert answer["status"] == 409 and "cancelled" in json.dumps(answer["body"])
    assert sorted(p.name for p in forge.iterdir()) == before  # no file, no temp file


def test_a_gguf_unet_merges_and_loads_beside_forges_modules_where_try_is_refused(forge):
    """Forge lists GGUF files, to load one as the diffusion model beside the VAE and text encoder
    chosen in its "VAE / Text Encoder" list (an SD1.5 GGUF holding all three it cannot load: its
    text encoder loader takes no GGUF tensor). Merge Lab reads the GGUF (dequantised by the gguf
    package), merges it with a safetensors file and loads the merge beside the same modules. A Try
    is refused while modules are chosen, and a Try over the GGUF file for being one (Forge would
    hold its weights quantised); the loaded model is kept. Forge itself fails to load an SD1.5
    GGUF UNet (its GGUF shapes are numpy integers that its UNet's config turns into floats:
    "TypeError: empty(): argument 'size'"), so the GGUF is not loaded on its own here."""
    modules = [str(FORGE / "models" / folder / f"merge_lab_e2e_{folder.lower()}.safetensors")
               for folder in ("VAE", "text_encoder")]  # fmt: skip
    gguf_and_b = {"primary_model_name": GGUF_UNET, "secondary_model_name": "rand_b.safetensors", "multiplier": 0.5}
    status, listed = call("/merge-lab/v1/models", None)
    assert status == 200 and GGUF_UNET in json.dumps(listed), listed
    call("/sdapi/v1/options", {"forge_additional_modules": modules})
    try:
        status, saved = call("/merge-lab/v1/merge", {**gguf_and_b, "custom_name": f"{MERGED}_gguf", "load": True})
        assert status == 200 and saved["loaded"], saved
        merged = forge_api.pixels_and_model(IMAGE)
        assert merged[1] == f"Model hash: {saved['sha256'][:10]}, Model: {MERGED}_gguf"

        status, answer = call("/merge-lab/v1/try", {**A_AND_B, "multiplier": 0.5})
        assert status == 422 and "Forge's 'VAE / Text Encoder' list has 2 module(s) chosen" in answer["detail"], answer
        assert forge_api.pixels_and_model(IMAGE) == merged

        status, answer = call("/merge-lab/v1/try", gguf_and_b)
        assert status == 422 and f"Try: {GGUF_UNET} is a GGUF file, which Forge holds quantised" in answer["detail"]
        assert forge_api.pixels_and_model(IMAGE) == merged
    finally:
        call("/sdapi/v1/options", {"sd_model_checkpoint": "rand_a.safetensors", "forge_additional_modules": []})


def test_try_is_refused_when_forge_holds_the_unet_in_bitsandbytes_nf4(forge):
    """Forge's "Diffusion in Low Bits" set to bnb-nf4 loads the UNet's linear weights as
    bitsandbytes 4-bit parameters. Forge installs bitsandbytes only where CUDA is, and quantises
    on the GPU, so here (CPU) they are Forge's real nf4 parameters not yet quantised, and no
    image can be made with them; the Try must still be refused, by what the parameters are.
    Needs bitsandbytes in Forge's venv (``pip install --no-deps bitsandbytes==0.45.3``, the
    version Forge pins), which ../shared/forge-offline leaves out."""
    python = FORGE.parent / "venv" / "bin" / "python"
    if subprocess.run([str(python), "-c", "import bitsandbytes"], capture_output=True).returncode != 0:
        pytest.skip(f"bitsandbytes is not installed in {python.parent.parent}")
    call("/sdapi/v1/options", {"sd_model_checkpoint": "rand_a.safetensors"})
    try:
        call("/sdapi/v1/options", {"forge_unet_storage_dtype": "bnb-nf4", "sd_model_checkpoint": "rand_b.safetensors"})
        status, answer = call("/merge-lab/v1/try", {**A_AND_B, "primary_model_name": "rand_b.safetensors"})
        assert status == 422 and "Forge holds the loaded model's unet in bitsandbytes nf4/fp4" in answer["detail"]
    finally:
        call(
            "/sdapi/v1/options", {"forge_unet_storage_dtype": "Automatic", "sd_model_checkpoint": "rand_a.safetensors"}
        )


@pytest.fixture(scope="module")
def forge_fp8(forge):
    """Forge restarted with its UNet stored in fp8 ("Diffusion in Low Bits"), computed in fp32."""
    subprocess.run(["bash", str(KIT / "stop.sh"), str(FORGE)], check=True)
    start_forge(FORGE_CPU_FLAGS="--always-cpu --clip-in-fp32 --unet-in-fp8-e4m3fn")
    return forge


def test_try_is_refused_when_forge_holds_the_unet_in_fp8_and_the_model_is_kept(forge_fp8):
    call("/sdapi/v1/options", {"sd_model_checkpoint": "rand_a.safetensors"})
    before = forge_api.pixels_and_model(IMAGE)
    status, answer = call("/merge-lab/v1/try", {**A_AND_B, "multiplier": 0.5})
    assert status == 422 and "Forge holds the loaded model's unet in float8_e4m3fn" in answer["detail"], answer
    assert forge_api.pixels_and_model(IMAGE) == before


@pytest.fixture(scope="module")
def forge_sdxl(forge):
    """Forge restarted with its UNet stored in fp16 (computed in fp32 on the CPU), as on most GPUs: an
    SDXL UNet in fp32 beside the file Forge reads whole to load it does not fit in 24 GB of RAM."""
    subprocess.run(["bash", str(KIT / "stop.sh"), str(FORGE)], check=True)
    for name, seed in SDXL_INPUTS.items():  # made only for this test; removed with the other new files
        subprocess.run([sys.executable, str(ROOT / "tests" / "make_sdxl_checkpoint.py"), str(forge / name),
                        "--seed", str(seed)], check=True)  # fmt: skip
    start_forge(FORGE_CPU_FLAGS="--always-cpu --clip-in-fp32 --unet-in-fp16")
    call("/sdapi/v1/options", {"live_previews_enable": False})  # SDXL's preview model would be downloaded
    return forge


def test_sdxl_merge_load_and_try_give_the_same_images(forge_sdxl):
    """SDXL in Forge: CLIP-G's q/k/v are one tensor in the file and three in Forge's model, and its
    text projection is transposed; a Try must land them as Forge's loader does."""
    forge = forge_sdxl
    xl = {"primary_model_name": "merge_lab_xl_a.safetensors", "secondary_model_name": "merge_lab_xl_b.safetensors",
          "multiplier": 0.4, "save_as_half": True}  # fmt: skip
    status, saved = call("/merge-lab/v1/merge", {**xl, "custom_name": f"{MERGED}_xl", "load": True})
    assert status == 200 and saved["loaded"], saved
    from_file = forge_api.pixels_and_model(IMAGE)
    assert from_file[1] == f"Model hash: {saved['sha256'][:10]}, Model: {MERGED}_xl"

    status, tried = call("/merge-lab/v1/try", xl)
    assert status == 200, tried
    with_try = forge_api.pixels_and_model(IMAGE)
    assert with_try[1] == f"Model hash: {tried['recipe_hash']}, Model: {tried['name']}"
    assert with_try[0] == from_file[0]  # pixel-identical to the saved file
    call("/sdapi/v1/options", {"sd_model_checkpoint": "merge_lab_xl_b.safetensors"})
    assert forge_api.pixels_and_model(IMAGE)[0] != with_try[0]  # the images do depend on the weights
    (forge / f"{MERGED}_xl.safetensors").unlink()  # 6.9 GB: not kept until the end
