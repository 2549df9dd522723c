"""Output names, metadata, recipes and config copies, as the built-in makes them."""

import hashlib
import json

import pytest
from conftest import make
from safetensors import safe_open

from lib_merge import MergeRequest, RequestError, merge, run_modelmerger


def metadata_of(path):
    with safe_open(str(path), "pt") as file:
        return file.metadata() or {}


@pytest.mark.parametrize(
    ("method", "multiplier", "expected"),
    [
        ("Weighted sum", 0.3, "0.7(a) + 0.3(b).safetensors"),
        ("Weighted sum", 0.333, "0.67(a) + 0.33(b).safetensors"),
        ("Add difference", 1, "a + 1.0(b - c).safetensors"),
        ("No interpolation", 0.3, "a.safetensors"),
    ],
)
def test_output_names_follow_the_builtin(host, method, multiplier, expected):
    request = MergeRequest("a.safetensors", "b.safetensors", "c.safetensors", method, multiplier)
    if method == "No interpolation":
        request = MergeRequest("a.safetensors", interp_method=method, output_path="")
        with pytest.raises(Exception, match="is one of the inputs"):
            merge(request, host)
        return
    assert merge(request, host).path.name == expected


def test_run_modelmerger_takes_the_builtins_16_parameters_and_titles(host, models):
    result = run_modelmerger(
        "task(1)",
        "a.safetensors [0123456789]",
        "b.safetensors",
        "",
        "Weighted sum",
        0.5,
        False,
        "named",
        "ckpt",
        0,
        "None",
        "",
        True,
        True,
        True,
        "{}",
        host=host,
    )
    assert result.path == models / "named.ckpt"
    assert hashlib.sha256(result.path.read_bytes()).hexdigest() == result.sha256


def test_metadata_carries_format_recipe_and_merge_models(host, models):
    make(
        models / "parent.safetensors",
        seed=8,
        metadata={"sd_merge_recipe": json.dumps({"type": "webui"}), "note": "from a"},
    )
    result = merge(
        MergeRequest(
            "parent.safetensors",
            "b.safetensors",
            multiplier=0.5,
            custom_name="child",
            metadata_json='{"author": "me", "n": 3}',
        ),
        host,
    )
    metadata = metadata_of(result.path)
    assert metadata["format"] == "pt"
    assert metadata["note"] == "from a" and metadata["author"] == "me" and metadata["n"] == "3"
    recipe = json.loads(metadata["sd_merge_recipe"])
    sha_a, sha_b = (
        hashlib.sha256((models / n).read_bytes()).hexdigest() for n in ("parent.safetensors", "b.safetensors")
    )
    assert recipe == {
        "type": "merge-lab",
        "primary_model_hash": sha_a,
        "secondary_model_hash": sha_b,
        "tertiary_model_hash": None,
        "interp_method": "Weighted sum",
        "multiplier": 0.5,
        "save_as_half": False,
        "custom_name": "child",
        "config_source": 0,
        "bake_in_vae": "None",
        "discard_weights": "",
        "is_inpainting": False,
        "is_instruct_pix2pix": False,
        "merge_lab_recipe": {
            "merge_lab_recipe": 1,
            "merge": {
                "method": "weighted_sum",
                "models": [
                    {"model": "parent.safetensors", "sha256": sha_a},
                    {"model": "b.safetensors", "sha256": sha_b},
                ],
                "params": {"alpha": 0.5},
            },
            "output": {
                "save_as_half": False,
                "custom_name": "child",
                "checkpoint_format": "safetensors",
                "config_source": 0,
                "bake_in_vae": "None",
                "discard_weights": "",
                "save_metadata": True,
                "add_merge_recipe": True,
                "copy_metadata_fields": True,
            },
        },
        # stored once, as the file's own fields: the recipe names them (replay reads them back)
        "metadata_fields": ["author", "n"],
    }
    models_field = json.loads(metadata["sd_merge_models"])
    assert models_field[sha_a]["name"] == "parent.safetensors"
    assert models_field[sha_a]["sd_merge_recipe"] == {"type": "webui"}
    assert len(models_field[sha_a]["legacy_hash"]) == 8
    # a merge of the merge carries its grandparents
    grand = merge(MergeRequest("child.safetensors", "a.safetensors", multiplier=0.5, custom_name="grandchild"), host)
    assert sha_a in json.loads(metadata_of(grand.path)["sd_merge_models"])


def test_no_metadata_and_no_copy(host):
    bare = merge(MergeRequest("a.safetensors", "b.safetensors", save_metadata=False, custom_name="bare"), host)
    assert metadata_of(bare.path) == {}
    lean = merge(MergeRequest("a.safetensors", "b.safetensors", add_merge_recipe=False, custom_name="lean"), host)
    assert metadata_of(lean.path) == {"format": "pt"}


def test_invalid_metadata_json_is_refused_by_field_name(host):
    with pytest.raises(RequestError, match="metadata_json"):
        merge(MergeRequest("a.safetensors", "b.safetensors", metadata_json="{not json"), host)
    assert not list(host.output_dir().glob("0.7*"))


@pytest.mark.parametrize(("source", "expected"), [(0, "a"), (1, "b"), (2, "c"), (3, None)])
def test_config_copied_as_config_source_says(host, models, source, expected):
    for name in ("a", "b", "c"):
        (models / f"{name}.yaml").write_text(f"model: {name}\n")
    result = merge(
        MergeRequest("a.safetensors", "b.safetensors", "c.safetensors", "Add difference", config_source=source), host
    )
    config = result.path.with_suffix(".yaml")
    assert (config.read_text() if config.exists() else None) == (f"model: {expected}\n" if expected else None)
