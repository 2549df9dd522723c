"""The tab's method controls <-> recipes, and the block chart, without gradio."""

import pytest

from lib_merge.errors import RequestError
from lib_merge.recipe import request_from_recipe
from lib_merge.ui.recipe_fields import PARAM_NAMES, block_chart, controls_from_recipe, recipe_from_controls

pytestmark = pytest.mark.gradio_both  # free of gradio, but the tab's values: .ci/run runs it under both


def controls(**values):
    base = {"primary_model_name": "a.safetensors", "secondary_model_name": "b.safetensors", "multiplier": 0.3}
    base.update({f"param_{name}": None for name in PARAM_NAMES})
    return {**base, **values}


def test_the_builtins_own_fields_need_no_recipe():
    assert recipe_from_controls(controls(interp_method="Weighted sum")) is None


def test_ties_with_more_models_and_blocks_becomes_a_recipe_and_back():
    fields = controls(
        interp_method="TIES", tertiary_model_name="c.safetensors", more_models=["d.safetensors"],
        param_density=0.4, param_lambda=0.9, param_weights="1, -1, 0.5", block_param="lambda",
        block_text="IN*=0.5", custom_name="mine",
    )  # fmt: skip
    recipe = recipe_from_controls(fields)
    node = recipe["merge"]
    assert [m for m in node["models"]] == ["a.safetensors", "b.safetensors", "c.safetensors", "d.safetensors"]
    assert node["params"] == {"density": 0.4, "lambda": 0.9, "weights": "1, -1, 0.5"}
    assert node["blocks"] == {"lambda": "IN*=0.5"} and recipe["output"] == {"custom_name": "mine"}
    request = request_from_recipe(recipe)  # valid as the engine reads it
    assert request.root().params["density"] == 0.4
    back = controls_from_recipe(recipe)
    assert back["interp_method"] == "TIES" and back["more_models"] == ["d.safetensors"]
    assert back["param_density"] == 0.4 and back["block_text"] == "IN*=0.5" and back["custom_name"] == "mine"


def test_a_bad_value_is_named_when_the_recipe_is_read():
    with pytest.raises(RequestError, match=r"merge\.params\.density"):
        request_from_recipe(recipe_from_controls(controls(interp_method="TIES", param_density=0)))


def test_a_nested_recipe_is_not_forced_into_the_flat_controls():
    nested = {"merge": {"method": "soup", "models": ["a", {"method": "soup", "models": ["b", "c"]}]}}
    assert controls_from_recipe(nested) is None


def test_the_chart_draws_one_bar_per_block_and_names_a_bad_list():
    assert block_chart("ramp_in_out", "SD1", 0.5, "alpha").count("<rect") == 26
    assert block_chart("flat", "SDXL", 0.5, "alpha").count("<rect") == 20
    assert "blocks.alpha: expected 26 values" in block_chart("1,2,3", "SD1", 0.5, "alpha")


@pytest.mark.parametrize(
    ("family", "bars", "last"),
    [("Flux dev", 58, "S37"), ("Flux schnell", 58, "S37"), ("SD3 medium", 25, "J23"), ("SD3.5 large", 39, "J37")],
)
def test_the_chart_draws_the_blocks_of_flux_and_sd3(family, bars, last):
    chart = block_chart("ramp_in_out", family, 0.5, "alpha")
    assert chart.count("<rect") == bars and f"<title>{last}: 1</title>" in chart
    assert f"alpha per block ({family})" in chart
    assert f"blocks.alpha: expected {bars} values for {family}" in block_chart(
        ",".join(["1"] * 26), family, 0.5, "alpha"
    )


def test_the_chart_of_an_unknown_model_uses_the_sd1_blocks_and_an_sd3_of_unknown_size_one_bar():
    assert block_chart("flat", "unknown", 0.5, "alpha").count("<rect") == 26
    assert block_chart("0.4", "SD3", 0.5, "alpha").count("<rect") == 1


def test_a_picker_the_recipe_leaves_unused_is_cleared_not_set_to_an_empty_choice():
    back = controls_from_recipe(recipe_from_controls(controls(interp_method="Model soup")))
    assert (back["primary_model_name"], back["secondary_model_name"]) == ("a.safetensors", "b.safetensors")
    assert back["tertiary_model_name"] is None and back["more_models"] == []
