"""The HTTP routes with FastAPI's test client over real checkpoint files (a FolderHost)."""

from __future__ import annotations

import base64

import pytest
from conftest import SDXL, load, make

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from lib_merge.api import add_routes  # noqa: E402


@pytest.fixture
def client(host):
    app = fastapi.FastAPI()
    add_routes(app, host)
    return TestClient(app)


def test_merge_takes_the_builtin_parameters_by_name_and_returns_path_title_and_hash(client, models):
    body = {"primary_model_name": "a.safetensors", "secondary_model_name": "b.safetensors", "multiplier": 0.5}
    response = client.post("/merge-lab/v1/merge", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["title"] == "0.5(a) + 0.5(b).safetensors"
    assert answer["path"] == str(models / "0.5(a) + 0.5(b).safetensors")
    assert answer["loaded"] is False  # a folder has no current model
    merged, a, b = (load(models / name) for name in ("0.5(a) + 0.5(b).safetensors", "a.safetensors", "b.safetensors"))
    key = "model.diffusion_model.out.2.bias"
    assert merged[key].double().allclose((a[key].double() + b[key].double()) / 2, atol=1e-3)


def test_every_webui_parameter_and_the_extras_are_accepted(client, models):
    body = {
        "id_task": "task(1)",
        "primary_model_name": "a.safetensors",
        "secondary_model_name": "b.safetensors",
        "tertiary_model_name": "c.safetensors",
        "interp_method": "Add difference",
        "multiplier": 1.5,
        "save_as_half": True,
        "custom_name": "diff",
        "checkpoint_format": "safetensors",
        "config_source": "Don't",
        "bake_in_vae": "None",
        "discard_weights": "^cond_stage_model",
        "save_metadata": True,
        "add_merge_recipe": True,
        "copy_metadata_fields": False,
        "metadata_json": '{"note": "via API"}',
        "overwrite": False,
        "device": "cpu",
        "load": True,
    }
    assert len(body) == 16 + 3
    response = client.post("/merge-lab/v1/merge", json=body)
    assert response.status_code == 200, response.text
    merged = load(models / "diff.safetensors")
    assert not any(key.startswith("cond_stage_model") for key in merged)


@pytest.mark.parametrize(
    ("change", "status", "named"),
    [
        ({"primary_model_name": "missing.safetensors"}, 400, "missing.safetensors"),
        ({"interp_method": "Bogus"}, 422, "interp_method"),
        ({"multiplier": "a lot"}, 422, "multiplier"),
        ({"config_source": 9}, 422, "config_source"),
        ({"checkpoint_format": "bin"}, 422, "checkpoint_format"),
        ({"secondary_model_name": ""}, 422, "secondary"),
        ({"discard_weights": "("}, 422, "discard_weights"),
    ],
)
def test_bad_input_is_a_4xx_with_a_message_naming_it(client, models, change, status, named):
    body = {"primary_model_name": "a.safetensors", "secondary_model_name": "b.safetensors", **change}
    response = client.post("/merge-lab/v1/merge", json=body)
    assert response.status_code == status, response.text
    assert named in str(response.json()["detail"])
    assert sorted(p.name for p in models.iterdir()) == ["a.safetensors", "b.safetensors", "c.safetensors"]


def test_an_existing_output_is_refused_unless_overwrite(client, models):
    body = {"primary_model_name": "a.safetensors", "secondary_model_name": "b.safetensors", "custom_name": "out"}
    assert client.post("/merge-lab/v1/merge", json=body).status_code == 200
    first = (models / "out.safetensors").read_bytes()
    again = client.post("/merge-lab/v1/merge", json={**body, "multiplier": 0.9})
    assert again.status_code == 409
    assert "out.safetensors" in again.json()["detail"]
    assert (models / "out.safetensors").read_bytes() == first
    assert client.post("/merge-lab/v1/merge", json={**body, "multiplier": 0.9, "overwrite": True}).status_code == 200
    assert (models / "out.safetensors").read_bytes() != first


def test_incompatible_models_are_a_409(client, models):
    make(models / "xl.safetensors", specs=SDXL, seed=4)
    body = {"primary_model_name": "a.safetensors", "secondary_model_name": "xl.safetensors"}
    response = client.post("/merge-lab/v1/merge", json=body)
    assert response.status_code == 409, response.text
    assert not (models / "a + xl.safetensors").exists()


def test_models_lists_every_checkpoint_with_its_architecture(client, models):
    make(models / "xl.safetensors", specs=SDXL, seed=4)
    (models / "junk.safetensors").write_bytes(b"not a checkpoint")
    listed = {entry["name"]: entry for entry in client.get("/merge-lab/v1/models").json()}
    assert listed["a.safetensors"]["architecture"] == "SD1"
    assert listed["xl.safetensors"]["architecture"] == "SDXL"
    assert listed["a.safetensors"]["path"] == str(models / "a.safetensors")
    assert "junk.safetensors" in listed["junk.safetensors"]["error"]


def test_with_credentials_the_routes_need_basic_auth(host):
    app = fastapi.FastAPI()
    add_routes(app, host, {"merger": "s3cret"})
    client = TestClient(app)
    assert client.get("/merge-lab/v1/models").status_code == 401
    wrong = base64.b64encode(b"merger:guess").decode()
    assert client.get("/merge-lab/v1/models", headers={"Authorization": f"Basic {wrong}"}).status_code == 401
    right = base64.b64encode(b"merger:s3cret").decode()
    assert client.get("/merge-lab/v1/models", headers={"Authorization": f"Basic {right}"}).status_code == 200


def test_methods_lists_every_method_a_user_picks_with_its_parameters(client):
    from lib_merge.methods import METHODS

    listed = client.get("/merge-lab/v1/methods").json()
    assert [m["name"] for m in listed] == [name for name in METHODS if name != "add_delta"]  # a bake's step
    ties = next(m for m in listed if m["name"] == "ties")
    density = next(p for p in ties["params"] if p["name"] == "density")
    assert density == {**density, "default": 0.2, "range": "(0, 1]", "per_block": True}
    assert ties["inputs"] == ["base", "models"] and ties["min_inputs"] == 2 and ties["max_inputs"] is None


def test_merge_accepts_a_recipe_as_a_mapping_or_as_yaml_text(client, models):
    recipe = {
        "merge": {"method": "soup", "models": ["a.safetensors", "b.safetensors", "c.safetensors"]},
        "output": {"custom_name": "soup3"},
    }
    response = client.post("/merge-lab/v1/merge", json={"recipe": recipe})
    assert response.status_code == 200, response.text
    merged, *parts = (
        load(models / n) for n in ("soup3.safetensors", "a.safetensors", "b.safetensors", "c.safetensors")
    )
    key = "model.diffusion_model.out.2.bias"
    assert merged[key].double().allclose(sum(p[key].double() for p in parts) / 3, atol=1e-3)
    text = "merge:\n  method: ties\n  models: [a.safetensors, b.safetensors]\n  params: {density: 0.5}\n"
    text += "output: {custom_name: ties1}\n"
    assert client.post("/merge-lab/v1/merge", json={"recipe": text}).status_code == 200
    assert (models / "ties1.safetensors").exists()


def test_a_bad_recipe_is_a_422_naming_the_field(client, models):
    recipe = {"merge": {"method": "ties", "models": ["a.safetensors", "b.safetensors"], "params": {"density": 0}}}
    response = client.post("/merge-lab/v1/merge", json={"recipe": recipe})
    assert response.status_code == 422 and "merge.params.density" in response.json()["detail"]
    assert client.post("/merge-lab/v1/merge", json={}).status_code == 422


def test_sweep_merges_and_generates_each_point_and_refuses_where_no_model_is_loaded(client, models, tmp_path):
    """The sweep route over tests/image_host.py's ImageHost (a loaded model without a webui)."""
    from image_host import ImageHost

    app = fastapi.FastAPI()
    add_routes(app, ImageHost(models, tmp_path / "grids", hash_cache=tmp_path / "hashes.json"))
    body = {"primary_model_name": "a.safetensors", "secondary_model_name": "b.safetensors", "x_param": "alpha",
            "x_values": "0.2, 0.8", "prompt": "a cat", "seed": 5, "width": 8, "height": 8}  # fmt: skip
    answer = TestClient(app).post("/merge-lab/v1/sweep", json=body)
    assert answer.status_code == 200, answer.text
    found = answer.json()
    assert [cell["label"] for cell in found["cells"]] == ["alpha 0.2", "alpha 0.8"] and found["seed"] == 5
    assert [cell["recipe"]["merge"]["params"]["alpha"] for cell in found["cells"]] == [0.2, 0.8]
    assert found["grid"].startswith(str(tmp_path / "grids")) and not found["cancelled"]

    bad = TestClient(app).post("/merge-lab/v1/sweep", json={**body, "x_values": "0.2, nope"})
    assert bad.status_code == 422 and "sweep.alpha" in bad.json()["detail"]
    refused = client.post("/merge-lab/v1/sweep", json=body)  # a plain folder: no model to merge into
    assert refused.status_code == 422 and "loaded model" in refused.json()["detail"]
