"""The LoRA routes with FastAPI's test client over real files: a FolderHost with a models folder
and a LoRA folder, LoRAs made with real kohya key names."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SD15, assert_within_one_ulp, load, make
from make_lora import SD15_KOHYA, SDXL_KOHYA, kohya_lora, low_rank_change, sdxl_specs, tuned_checkpoint

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from lib_merge.api import add_routes  # noqa: E402
from lib_merge.hosts import FolderHost  # noqa: E402

LINEAR = next(key for key in SD15_KOHYA.values() if len(SD15[key].shape) == 2)


@pytest.fixture
def folders(tmp_path):
    models, loras = tmp_path / "models", tmp_path / "Lora"
    make(models / "a.safetensors", SD15, seed=1)
    loras.mkdir()
    kohya_lora(loras / "style.safetensors", SD15_KOHYA, SD15, alpha=1.0, seed=1)
    kohya_lora(loras / "detail.safetensors", SD15_KOHYA, SD15, alpha=1.0, seed=2)
    kohya_lora(loras / "xl.safetensors", SDXL_KOHYA, sdxl_specs())
    return models, loras


@pytest.fixture
def client(folders, tmp_path):
    models, loras = folders
    app = fastapi.FastAPI()
    add_routes(app, FolderHost(models, lora_dir=loras, hash_cache=tmp_path / "hashes.json", device="cpu"))
    return TestClient(app)


def _change(path) -> dict[str, torch.Tensor]:
    """Each patched key's float64 change, from the file: up @ down * alpha / rank."""
    tensors, changes = load(path), {}
    for name, key in SD15_KOHYA.items():
        up = tensors[f"{name}.lora_up.weight"].double().flatten(1)
        down = tensors[f"{name}.lora_down.weight"].double()
        changes[key] = (up @ down.flatten(1)).reshape(SD15[key].shape) * tensors[f"{name}.alpha"].item() / len(down)
    return changes


def _files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_loras_lists_the_lora_folder(client):
    response = client.get("/merge-lab/v1/loras")
    assert response.status_code == 200
    assert [item["name"] for item in response.json()] == ["detail.safetensors", "style.safetensors", "xl.safetensors"]


def test_bake_writes_the_checkpoint_with_the_loras_at_their_ratios(client, folders):
    models, loras = folders
    body = {
        "checkpoint": "a.safetensors",
        "loras": [{"name": "style.safetensors", "ratio": 0.5}, "detail.safetensors:-0.25"],
        "custom_name": "baked",
        "dtype": "fp32",
    }
    response = client.post("/merge-lab/v1/lora/bake", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["path"] == str(models / "baked.safetensors")
    a, out = load(models / "a.safetensors"), load(models / "baked.safetensors")
    style, detail = _change(loras / "style.safetensors"), _change(loras / "detail.safetensors")
    for key in SD15_KOHYA.values():
        assert_within_one_ulp(out[key], (a[key].double() + 0.5 * style[key] - 0.25 * detail[key]).float(), key)
    with open(models / "baked.safetensors", "rb") as file:
        header = json.loads(file.read(int.from_bytes(file.read(8), "little")))
    tree = json.loads(header["__metadata__"]["sd_merge_recipe"])["merge_lab_recipe"]["merge"]
    assert tree["models"][1]["lora"] == "detail.safetensors" and tree["params"] == {"alpha": -0.25}


def test_extract_writes_into_the_lora_folder_and_the_list_shows_it(client, folders):
    models, loras = folders
    generator = torch.Generator().manual_seed(3)
    tuned_checkpoint(
        models / "tuned.safetensors",
        models / "a.safetensors",
        {LINEAR: low_rank_change(SD15[LINEAR].shape, 2, generator)},
    )
    body = {"base": "a.safetensors", "tuned": "tuned.safetensors", "rank": 2, "clamp_quantile": 1, "name": "tuned-r2"}
    response = client.post("/merge-lab/v1/lora/extract", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["name"] == "tuned-r2.safetensors" and answer["path"] == str(loras / "tuned-r2.safetensors")
    assert "tuned-r2.safetensors" in [item["name"] for item in client.get("/merge-lab/v1/loras").json()]
    with open(loras / "tuned-r2.safetensors", "rb") as file:
        metadata = json.loads(file.read(int.from_bytes(file.read(8), "little")))["__metadata__"]
    assert metadata["ss_network_dim"] == "2" and metadata["ss_sd_model_name"] == "a.safetensors"
    again = client.post("/merge-lab/v1/lora/extract", json=body)
    assert again.status_code == 409 and "already exists" in again.json()["detail"]


def test_merge_writes_one_lora_into_the_lora_folder(client, folders):
    _, loras = folders
    body = {"loras": [{"name": "style.safetensors", "ratio": 0.5}, {"name": "detail.safetensors"}], "name": "both"}
    response = client.post("/merge-lab/v1/lora/merge", json=body)
    assert response.status_code == 200, response.text
    merged = load(loras / "both.safetensors")
    assert len(merged) == 3 * len(SD15_KOHYA)  # up, down, alpha per module, ranks concatenated
    assert response.json()["modules"] == len(SD15_KOHYA)


@pytest.mark.parametrize(
    ("route", "body", "status", "named"),
    [
        ("bake", {"checkpoint": "a.safetensors", "loras": ["../Lora/style.safetensors"]}, 422, "'..' is not accepted"),
        ("bake", {"checkpoint": "a.safetensors", "loras": ["/etc/passwd"]}, 422, "absolute paths"),
        (
            "bake",
            {"checkpoint": "a.safetensors", "loras": [{"name": "style.safetensors", "ratio": "x"}]},
            422,
            "loras[0].ratio",
        ),
        (
            "bake",
            {"checkpoint": "a.safetensors", "loras": [{"name": "style.safetensors", "ratio": 10**400}]},
            422,
            "loras[0].ratio",
        ),
        ("bake", {"checkpoint": "a.safetensors", "loras": []}, 422, "loras:"),
        ("bake", {"checkpoint": "a.safetensors", "loras": ["xl.safetensors"]}, 409, "is a LoRA for SDXL"),
        ("bake", {"checkpoint": "a.safetensors", "loras": ["nope.safetensors"]}, 400, "no such LoRA"),
        (
            "bake",
            {"checkpoint": "a.safetensors", "loras": ["style.safetensors"], "custom_name": "../x"},
            422,
            "custom_name",
        ),
        (
            "extract",
            {"base": "a.safetensors", "tuned": "a.safetensors", "rank": 0},
            422,
            "rank: a rank is a whole number",
        ),
        ("extract", {"base": "a.safetensors", "tuned": "a.safetensors", "rank": 10**400}, 422, "rank:"),
        (
            "extract",
            {"base": "a.safetensors", "tuned": "a.safetensors", "rank": 4, "clamp_quantile": 2},
            422,
            "clamp_quantile",
        ),
        ("extract", {"base": "a.safetensors", "tuned": "a.safetensors", "rank": 4, "name": "../up"}, 422, "name:"),
        ("extract", {"base": "a.safetensors", "tuned": "a.safetensors", "rank": 4, "device": "meta"}, 422, "device"),
        ("extract", {"base": "../models/a.safetensors", "tuned": "a.safetensors", "rank": 4}, 422, "base:"),
        ("extract", {"base": "a.safetensors", "tuned": "a.safetensors", "rank": 4, "dtype": "fp8"}, 422, "dtype"),
        ("merge", {"loras": ["style.safetensors", "xl.safetensors"]}, 409, "xl.safetensors"),
        ("merge", {"loras": ["style.safetensors"], "rank": "four"}, 422, "rank:"),
    ],
)
def test_bad_input_is_a_4xx_naming_the_field_and_nothing_is_written(client, folders, route, body, status, named):
    models, loras = folders
    before = (_files(models), _files(loras))
    response = client.post(f"/merge-lab/v1/lora/{route}", json=body)
    assert response.status_code == status, response.text
    assert named in response.json()["detail"]
    assert (_files(models), _files(loras)) == before


def test_try_and_sweep_take_a_bake_as_a_recipe_and_vary_its_lora_ratio(folders, tmp_path):
    """The try and sweep routes over tests/image_host.py's ImageHost (a loaded model without a
    webui), with a LoRA folder: a sweep's alpha is the baked LoRA's ratio, each cell a bake."""
    from image_host import ImageHost

    models, loras = folders
    host = ImageHost(models, tmp_path / "grids", hash_cache=tmp_path / "hashes.json")
    host.lora_folder = loras
    app = fastapi.FastAPI()
    add_routes(app, host)
    bake = {"method": "add_delta", "models": ["a.safetensors", {"lora": "style.safetensors"}], "params": {"alpha": 1}}
    tried = TestClient(app).post("/merge-lab/v1/try", json={"recipe": {"merge": bake}})
    assert tried.status_code == 200, tried.text
    assert tried.json()["name"] == "a + 1.0(style)"
    body = {"recipe": {"merge": bake}, "x_param": "alpha", "x_values": "0, 0.5", "prompt": "a cat", "seed": 5,
            "width": 8, "height": 8}  # fmt: skip
    answer = TestClient(app).post("/merge-lab/v1/sweep", json=body)
    assert answer.status_code == 200, answer.text
    cells = answer.json()["cells"]
    assert [cell["name"] for cell in cells] == ["a + 0.0(style)", "a + 0.5(style)"]
    assert [cell["recipe"]["merge"]["models"][1]["lora"] for cell in cells] == ["style.safetensors"] * 2
    assert [cell["recipe"]["merge"]["params"]["alpha"] for cell in cells] == [0.0, 0.5]


def test_the_tabs_sweep_bake_varies_the_last_loras_ratio_and_shows_each_cell(folders, tmp_path):
    """The LoRA section's Sweep bake handler over the ImageHost: the Sweep section's axes and image
    fields (numbers as gradio gives them), the bake's rows; a bad axis is shown, not raised."""
    from image_host import ImageHost

    from lib_merge.ui import lora_section

    models, loras = folders
    host = ImageHost(models, tmp_path / "grids", hash_cache=tmp_path / "hashes.json")
    host.lora_folder = loras
    rows = {"bake_checkpoint": "a.safetensors", "bake_custom_name": "", "bake_dtype": "keep"}
    rows |= {"bake_overwrite": False, "bake_load": False}
    for row, (name, ratio) in enumerate(
        [("style.safetensors", 0.8), ("detail.safetensors", 1.0), ("", 1.0), ("", 1.0)]
    ):
        rows |= {f"bake_lora_{row}": name, f"bake_ratio_{row}": ratio, f"bake_blocks_{row}": ""}
    axes = {"x_param": "alpha", "x_values": "0.2, 0.6", "y_param": "", "y_values": ""}
    image = {"prompt": "a cat", "negative_prompt": "", "seed": 5.0, "steps": 20.0, "width": 8.0, "height": 8.0,
             "sampler": "", "cfg_scale": 7.0}  # fmt: skip

    def sweep(axes):
        fields = lora_section.bake_fields(rows, "cpu")
        return lora_section.sweep_bake(host, fields, axes, image, "", "page", lambda *args, **kwargs: None)

    pictures, message, cell_choices, recipes = sweep(axes)
    assert "merge-lab-done" in message and len(pictures) == 3  # the grid and its 2 cells
    assert list(recipes) == cell_choices["choices"]
    names = [caption.split(": ", 1)[1].split(" [")[0] for _, caption in pictures[1:]]
    assert names == ["a + 0.8(style) + 0.2(detail)", "a + 0.8(style) + 0.6(detail)"]
    for recipe, ratio in zip(recipes.values(), (0.2, 0.6), strict=True):
        outer = recipe["merge"]
        assert outer["models"][1]["lora"] == "detail.safetensors" and outer["params"]["alpha"] == ratio
        assert outer["models"][0]["params"]["alpha"] == 0.8  # the first LoRA keeps its ratio
    pictures, message, _, recipes = sweep({**axes, "x_param": "density"})
    assert pictures == [] and recipes == {} and "density" in message and "merge-lab-error" in message
