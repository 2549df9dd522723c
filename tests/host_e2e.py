"""What the real-host end-to-end tests (test_webui_e2e.py, test_forge_e2e.py) share: HTTP calls to the
host, gradio widgets driven in chromium, screenshots, and images compared by their pixels."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

SHOTS = os.environ.get("MERGE_LAB_SCREENSHOTS")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


class Client:
    """JSON over HTTP to a running host, with basic auth when the host has --api-auth."""

    def __init__(self, url: str, auth: str | None = None):
        self.url = url
        self.auth = auth

    def call(self, path: str, body: dict | None = None, method: str | None = None, auth: bool = True):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method or ("POST" if data else "GET"))
        request.add_header("Content-Type", "application/json")
        if self.auth and auth:
            request.add_header("Authorization", "Basic " + base64.b64encode(self.auth.encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=900) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as err:
            return err.code, json.load(err)

    def pixels_and_model(self, body: dict) -> tuple[str, str]:
        """txt2img through the API: a hash of the image's pixels (not of the PNG, whose text chunk
        holds the infotext) and the infotext's Model / Model hash fields."""
        image, fields = self.image_and_model(body)
        return hashlib.sha256(image.tobytes()).hexdigest(), fields

    def image_and_model(self, body: dict):
        """txt2img through the API: the image (PIL) and the infotext's Model / Model hash fields."""
        from PIL import Image

        status, answer = self.call("/sdapi/v1/txt2img", body)
        assert status == 200, answer
        image = Image.open(io.BytesIO(base64.b64decode(answer["images"][0])))
        info = json.loads(answer["info"])["infotexts"][0]
        return image, ", ".join(f for f in info.split(", ") if f.startswith("Model"))

    def check_fp8_output_and_its_try(self, image: dict, models: Path, name: str) -> None:
        """A merge of rand_a + rand_b saved in fp8 e4m3fn and loaded, then the same request tried
        over rand_a: the file holds fp8 weights (the integer ids and the noise schedule's buffers
        as they were), and the tried weights,
        rounded to fp8 before they meet the model's own dtype, give the loaded file's pixels."""
        request = {"primary_model_name": "rand_a.safetensors", "secondary_model_name": "rand_b.safetensors",
                   "multiplier": 0.4, "dtype": "fp8_e4m3fn"}  # fmt: skip
        status, saved = self.call("/merge-lab/v1/merge", {**request, "custom_name": name, "load": True})
        assert status == 200 and saved["loaded"], saved
        header = header_of(models / f"{name}.safetensors")
        del header["__metadata__"]
        assert {entry["dtype"] for key, entry in header.items() if "." in key} == {"F8_E4M3", "I64"}
        assert {entry["dtype"] for key, entry in header.items() if "." not in key} == {"F16"}  # the schedule
        from_file = self.pixels_and_model(image)
        assert from_file[1].endswith(f"Model: {name}"), from_file

        self.call("/sdapi/v1/options", {"sd_model_checkpoint": "rand_a.safetensors"})
        status, tried = self.call("/merge-lab/v1/try", request)
        assert status == 200, tried
        with_try = self.pixels_and_model(image)
        assert with_try[1] == f"Model hash: {tried['recipe_hash']}, Model: {tried['name']}"
        assert with_try[0] == from_file[0]  # pixel-identical to the fp8 file
        self.call("/sdapi/v1/options", {"sd_model_checkpoint": "rand_a.safetensors"})

    def check_xyz_axes(self, image: dict, refusal_field: str) -> None:
        """The X/Y/Z plot's "Merge Lab: alpha" axis, with a checkpoint loaded as its file holds it:
        refused, saying why (the host's API puts the text under ``refusal_field``); then, after a
        Try of rand_a + rand_b, beside a CFG axis, every cell made with its own merge and CFG."""
        image = {**image, "script_name": "x/y/z plot"}
        rest = [True, True, False, False, False, False, False, 0, False]  # legend, lone images, ... margin, csv
        alpha = [self.xyz_index("Merge Lab: alpha"), "0.2, 0.6", []]
        status, answer = self.call("/sdapi/v1/txt2img", {**image, "script_args": [*alpha, 0, "", [], 0, "", [], *rest]})
        assert status == 500 and "Try a merge in the Merge Lab tab first" in answer[refusal_field], answer

        models = {"primary_model_name": "rand_a.safetensors", "secondary_model_name": "rand_b.safetensors"}
        assert self.call("/merge-lab/v1/try", {**models, "multiplier": 0.5})[0] == 200
        cfg = [self.xyz_index("CFG Scale"), "3, 7", []]
        status, answer = self.call("/sdapi/v1/txt2img", {**image, "script_args": [*alpha, *cfg, 0, "", [], *rest]})
        assert status == 200, answer
        cells = [text for text in json.loads(answer["info"])["infotexts"] if "X Type" not in text]
        seen = sorted((part(text, "Model: "), part(text, "CFG scale: ")) for text in cells)
        assert seen == [
            ("0.4(rand_a) + 0.6(rand_b)", "3.0"), ("0.4(rand_a) + 0.6(rand_b)", "7.0"),
            ("0.8(rand_a) + 0.2(rand_b)", "3.0"), ("0.8(rand_a) + 0.2(rand_b)", "7.0"),
        ]  # fmt: skip

    def xyz_index(self, label: str) -> int:
        """The index of an axis in txt2img's X/Y/Z plot, as its x_type dropdown (type=index) lists them."""
        status, scripts = self.call("/sdapi/v1/script-info")
        assert status == 200
        plot = next(s for s in scripts if s["name"] == "x/y/z plot" and not s["is_img2img"])
        x_type = next(arg for arg in plot["args"] if arg["label"] == "X type")
        return x_type["choices"].index(label)


def pick(page, elem_id: str, text: str) -> None:
    box = page.locator(f"#{elem_id} input")
    box.click()
    box.fill(text)
    page.locator(f"#{elem_id} ul.options li", has_text=text).first.click()


def set_number(page, elem_id: str, value) -> None:
    number = page.locator(f"#{elem_id} input[type=number]")
    number.fill(str(value))
    number.press("Enter")


def shot(page, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / name))


def open_merge_lab(page) -> None:
    page.locator("#tabs > .tab-nav button", has_text="Merge Lab").click()
    page.locator("#merge_lab_refresh").click()  # titles gain their hash once the webui has hashed a file
    page.wait_for_timeout(1500)


def choose_a_and_b(page, name: str) -> None:
    """rand_a and rand_b as A and B in the Merge Lab tab, and the output's name."""
    pick(page, "merge_lab_primary", "rand_a")
    pick(page, "merge_lab_secondary", "rand_b")
    page.locator("#merge_lab_custom_name textarea").fill(name)


def header_of(path: Path) -> dict:
    """A safetensors file's header: each key's dtype, shape and offsets, and ``__metadata__``."""
    with path.open("rb") as file:
        size = int.from_bytes(file.read(8), "little")
        return json.loads(file.read(size))


def recipe_of(path: Path) -> dict:
    """The Merge Lab recipe in a safetensors file's metadata."""
    metadata = header_of(path)["__metadata__"]
    return json.loads(metadata["sd_merge_recipe"])["merge_lab_recipe"]


def part(infotext: str, name: str) -> str:
    """One field of an infotext's parameter line (``Model: x`` -> ``x``)."""
    return infotext.split(name, 1)[1].split(", ")[0]


def wait_for_result(page, text: str) -> None:
    page.wait_for_function(
        "t => document.querySelector('#merge_lab_result')?.innerText.includes(t)", arg=text, timeout=900_000
    )


def txt2img_settings(page, size: int) -> None:
    """txt2img's prompt "a red fox", ``size`` x ``size``, 2 steps: what a sweep takes from txt2img."""
    page.locator("#txt2img_prompt textarea").fill("a red fox")
    for elem_id, value in (("txt2img_width", size), ("txt2img_height", size), ("txt2img_steps", 2)):
        set_number(page, elem_id, value)


def try_then_save_tried(page, models: Path, name: str) -> None:
    """In the tab: Try rand_a + rand_b at the default alpha 0.3 (no file written), then Save tried."""
    open_merge_lab(page)
    choose_a_and_b(page, name)
    before = sorted(p.name for p in models.iterdir())
    page.locator("#merge_lab_try").click()
    wait_for_result(page, "Trying:")
    assert f"Trying: {name} [" in page.locator("#merge_lab_result").last.inner_text()
    assert sorted(p.name for p in models.iterdir()) == before  # a try writes no file
    page.locator("#merge_lab_save_tried").click()
    wait_for_result(page, f"Saved: {name}")
    assert recipe_of(models / f"{name}.safetensors")["merge"]["params"]["alpha"] == 0.3


def sweep_with_txt2img_settings(page, x_values: str, points: int, size: int, outputs: Path) -> tuple[str, Path]:
    """In the tab: an alpha sweep over ``x_values`` with txt2img's settings (``txt2img_settings``).
    Returns the result text and the grid, saved under the host's ``outputs`` folder."""
    page.locator("#merge_lab_sweep").get_by_text("Sweep: an X/Y grid of images").click()
    page.locator("#merge_lab_custom_name textarea").fill("")
    page.locator("#merge_lab_x_values textarea").fill(x_values)
    page.locator("#merge_lab_from_txt2img").click()
    page.wait_for_function("() => document.querySelector('#merge_lab_prompt textarea').value === 'a red fox'")
    assert page.locator("#merge_lab_width input[type=number]").input_value() == str(size)
    page.locator("#merge_lab_sweep_run").click()
    wait_for_result(page, f"Sweep: {points} points")
    result = page.locator("#merge_lab_result").last.inner_text()
    grid = Path(result.split("Grid: ")[1].split("\n")[0])
    assert grid.is_file() and grid.is_relative_to(outputs)  # where the host saves grids
    assert "alpha 0.1: 0.9(rand_a) + 0.1(rand_b) [" in result and "alpha 0.9: 0.1(rand_a) + 0.9(rand_b) [" in result
    assert page.locator("#merge_lab_gallery img").count() == points + 1  # the grid, then each cell
    return result, grid


LORA_LAYERS = {"lora_unet_time_embed_0": (320, 1280), "lora_te_text_model_encoder_layers_0_mlp_fc1": (768, 3072)}


def write_lora(path: Path, layers: dict[str, tuple[int, int]] = LORA_LAYERS) -> Path:
    """A kohya-format LoRA for the kits' SD1.5 checkpoints: rank 4 on ``layers`` (module name: width
    in, width out; by default the UNet's time embedding and the text encoder's first MLP), random
    values large enough to change the image."""
    import safetensors.torch
    import torch

    generator = torch.Generator().manual_seed(5)
    tensors = {}
    for name, (width_in, width_out) in layers.items():
        tensors[f"{name}.lora_down.weight"] = 0.1 * torch.randn(4, width_in, generator=generator)
        tensors[f"{name}.lora_up.weight"] = 0.1 * torch.randn(width_out, 4, generator=generator)
        tensors[f"{name}.alpha"] = torch.tensor(4.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, str(path))
    return path


def check_lora_section(page, client: Client, lora_folder: Path, name: str) -> None:
    """In the tab: Extract rand_a -> rand_b at rank 4 into the host's LoRA folder, and txt2img's Lora
    cards list it without a restart; Try bake of it into rand_a at 0.8 gives rand_a's image with
    ``<lora:NAME:0.8>`` in the prompt, within one level of 255 (the largest difference is printed);
    the X/Y/Z plot's "Merge Lab: alpha" axis varies the tried bake's ratio, and so does Sweep bake
    with the Sweep section's axes."""
    import numpy as np

    card = page.locator(f'#txt2img_lora_cards_html .card[data-name="{name}"]')
    open_merge_lab(page)
    page.locator("#merge_lab_lora").get_by_text("LoRA: bake, extract, merge").click()
    page.locator("#merge_lab_lora .tab-nav button", has_text="Extract from two checkpoints").click()
    pick(page, "merge_lab_extract_base", "rand_a")
    pick(page, "merge_lab_extract_tuned", "rand_b")
    set_number(page, "merge_lab_extract_rank", 4)
    page.locator("#merge_lab_extract_name textarea").fill(name)
    assert card.count() == 0
    page.locator("#merge_lab_extract").click()
    wait_for_result(page, f"Saved LoRA: {name}.safetensors")
    assert (lora_folder / f"{name}.safetensors").is_file()
    card.wait_for(state="attached", timeout=60_000)  # the cards were refreshed: no restart, no click

    image = {"prompt": "a photo of a cat", "steps": 2, "width": 64, "height": 64, "seed": 7}
    client.call("/sdapi/v1/options", {"sd_model_checkpoint": "rand_a.safetensors"})
    plain = np.asarray(client.image_and_model(image)[0], dtype=np.int16)
    prompt = f"{image['prompt']} <lora:{name}:0.8>"
    prompted = np.asarray(client.image_and_model({**image, "prompt": prompt})[0], dtype=np.int16)
    page.locator("#merge_lab_lora .tab-nav button", has_text="Bake into a checkpoint").click()
    pick(page, "merge_lab_bake_checkpoint", "rand_a")
    pick(page, "merge_lab_bake_lora_0", name)
    set_number(page, "merge_lab_bake_ratio_0", 0.8)
    page.locator("#merge_lab_bake_try").click()
    wait_for_result(page, "Trying:")
    tried, model = client.image_and_model(image)
    assert model.endswith(f"Model: rand_a + 0.8({name})"), model
    tried = np.asarray(tried, dtype=np.int16)
    largest = int(np.abs(tried - prompted).max())
    print(f"Try bake at 0.8 vs <lora:{name}:0.8>: largest pixel difference {largest}, "
          f"{int((tried != prompted).sum())} of {tried.size} values differ")  # fmt: skip
    assert np.abs(prompted - plain).max() > 10  # the LoRA changes the image
    assert largest <= 1

    xyz = {**image, "script_name": "x/y/z plot"}
    rest = [True, True, False, False, False, False, False, 0, False]
    alpha = [client.xyz_index("Merge Lab: alpha"), "0.4, 0.8", []]
    status, answer = client.call("/sdapi/v1/txt2img", {**xyz, "script_args": [*alpha, 0, "", [], 0, "", [], *rest]})
    assert status == 200, answer
    cells = [text for text in json.loads(answer["info"])["infotexts"] if "X Type" not in text]
    assert sorted(part(text, "Model: ") for text in cells) == [f"rand_a + 0.4({name})", f"rand_a + 0.8({name})"]
    client.call("/sdapi/v1/options", {"sd_model_checkpoint": "rand_a.safetensors"})

    # Sweep bake: the Sweep section's axes and image fields over the bake, alpha its LoRA's ratio.
    page.locator("#merge_lab_sweep").get_by_text("Sweep: an X/Y grid of images").click()
    page.locator("#merge_lab_x_values textarea").fill("0.4, 0.8")
    page.locator("#merge_lab_prompt textarea").fill(image["prompt"])
    for field in ("width", "height", "steps"):
        set_number(page, f"merge_lab_{field}", image[field])
    page.locator("#merge_lab_bake_sweep").click()
    wait_for_result(page, "Sweep: 2 points")
    result = page.locator("#merge_lab_result").last.inner_text()
    assert f"alpha 0.4: rand_a + 0.4({name}) [" in result and f"alpha 0.8: rand_a + 0.8({name}) [" in result, result
    assert page.locator("#merge_lab_gallery img").count() == 3  # the grid, then each cell
