"""Sweep planning: parsing axes, the grid's order, and the trees each point merges."""

import pytest

from lib_merge import MergeRequest, RequestError
from lib_merge.loop.sweep import MAX_VALUES, SweepAxis, parse_axis, plan_sweep, point_name
from lib_merge.recipe import MergeNode, ModelRef, recipe_dict, request_from_recipe

BUILTIN = MergeRequest("a.safetensors", "b.safetensors", interp_method="Weighted sum", multiplier=0.3)
TIES_TREE = MergeNode(
    "ties",
    (ModelRef("base.safetensors"), ModelRef("x.safetensors"), ModelRef("y.safetensors")),
    {"density": 0.2, "lambda": 1.0},
    {"lambda": "BASE=0,IN*=0.5"},
)
TIES = MergeRequest("base.safetensors", tree=TIES_TREE, custom_name="ties-out")


def test_a_comma_list_is_read_in_order_as_numbers():
    axis = parse_axis("alpha", "0.3, 0.4,0.5 , 1", "Weighted sum")
    assert axis == SweepAxis("alpha", (0.3, 0.4, 0.5, 1.0))


def test_a_range_includes_its_stop_and_has_no_float_noise():
    axis = parse_axis("alpha", "0.2:0.6:0.1", "weighted_sum")
    assert axis.values == (0.2, 0.3, 0.4, 0.5, 0.6)
    assert [str(v) for v in axis.values] == ["0.2", "0.3", "0.4", "0.5", "0.6"]


def test_a_range_stops_before_a_stop_it_does_not_land_on():
    assert parse_axis("lambda", "0:1:0.3", "ties").values == (0.0, 0.3, 0.6, 0.9)


def test_a_falling_range_and_ranges_mixed_with_numbers():
    assert parse_axis("t", "1:0.5:-0.25", "slerp").values == (1.0, 0.75, 0.5)
    assert parse_axis("t", "0, 0.5:0.7:0.1, 1", "slerp").values == (0.0, 0.5, 0.6, 0.7, 1.0)


def test_an_int_parameter_gets_ints_and_multiplier_means_alpha():
    assert parse_axis("seed", "1:3:1", "dare").values == (1, 2, 3)
    assert all(type(v) is int for v in parse_axis("seed", "1:3:1", "dare").values)
    assert parse_axis("multiplier", "0.1,0.2", "Add difference").param == "alpha"


@pytest.mark.parametrize(
    ("param", "text", "method", "message"),
    [
        ("beta", "0.1", "ties", "sweep.beta: method ties has no such parameter (it can sweep: density, lambda"),
        ("weights", "0.1", "ties", "sweep.weights: method ties has a list parameter"),
        ("density", "0, 0.5", "ties", "sweep.density: 0 is outside (0, 1]"),
        ("density", "0.5, 1.5", "ties", "sweep.density: 1.5 is outside (0, 1]"),
        ("alpha", "0.1:0.5:0", "weighted_sum", "sweep.alpha: '0.1:0.5:0': the step is 0"),
        ("alpha", "0.1:0.5:-0.1", "weighted_sum", "sweep.alpha: '0.1:0.5:-0.1': a step of -0.1 never goes"),
        ("alpha", "0.5:0.1:0.1", "weighted_sum", "sweep.alpha: '0.5:0.1:0.1': a step of 0.1 never goes"),
        ("alpha", "0:1:0.01", "weighted_sum", f"sweep.alpha: '0:1:0.01' gives more than {MAX_VALUES} values"),
        ("alpha", ",".join(str(i) for i in range(65)), "weighted_sum", f"sweep.alpha: more than {MAX_VALUES}"),
        ("alpha", " , ", "weighted_sum", "sweep.alpha: no values given"),
        ("alpha", "0.1:0.5", "weighted_sum", "sweep.alpha: '0.1:0.5' is not a range start:stop:step"),
        ("alpha", "0.1, half", "weighted_sum", "sweep.alpha: expected a number, got 'half'"),
        ("alpha", "0.3, 0.1:0.3:0.1", "weighted_sum", "sweep.alpha: 0.3 is given twice"),
        ("seed", "0:1:0.5", "dare", "sweep.seed: expected a whole number"),
        ("blocks:lambda", "ramp_in_out; no_such_preset", "ties", "sweep.blocks:lambda: item 2 ('no_such_preset'): "),
        ("blocks:lambda", "0.5", "ties", "sweep.blocks:lambda: item 1 ('0.5'): expected 26 values for SD1"),
        ("blocks:density", " ;\n", "ties", "sweep.blocks:density: no block texts given"),
        ("blocks:seed", "flat", "dare", "sweep.blocks:seed: 'seed' is not a per-block parameter of dare"),
    ],
)
def test_bad_axes_are_refused_naming_the_field(param, text, method, message):
    with pytest.raises(RequestError) as caught:
        parse_axis(param, text, method)
    assert str(caught.value).startswith(message), str(caught.value)


def test_64_values_are_allowed():
    assert len(parse_axis("alpha", "0:0.63:0.01", "weighted_sum").values) == MAX_VALUES


def test_a_bad_preset_name_lists_the_presets():
    with pytest.raises(RequestError, match=r"'ramp_in_ou' is not a number or a preset \(.*ramp_in_out"):
        parse_axis("blocks:lambda", "ramp_in_ou", "ties")


def test_a_blocks_axis_reads_presets_and_block_lists_split_by_semicolons_and_lines():
    axis = parse_axis("blocks:lambda", "ramp_in_out; BASE=0,IN*=0.5\n  out_heavy,M00=0 ", "ties")
    assert axis == SweepAxis("blocks:lambda", ("ramp_in_out", "BASE=0,IN*=0.5", "out_heavy,M00=0"))


def test_a_block_list_is_checked_for_the_family_given():
    sdxl_list = ",".join(["0.5"] * 20)
    assert parse_axis("blocks:alpha", sdxl_list, "weighted_sum", family="SDXL").values == (sdxl_list,)
    with pytest.raises(RequestError, match="expected 26 values for SD1"):
        parse_axis("blocks:alpha", sdxl_list, "weighted_sum")


@pytest.mark.parametrize(
    ("family", "accepted", "refused", "message"),
    [
        ("Flux dev", "ramp_in_out; D*=0.2,S*=0.8; in_heavy,S37=1", "IN*=0.5", "'IN\\*' matches no Flux dev block"),
        ("Flux schnell", ",".join(["0.5"] * 58), ",".join(["0.5"] * 26), "expected 58 values for Flux schnell"),
        ("SD3 medium", "J*=0.3; ramp_out_in,J23=1", "J24=1", "'J24' matches no SD3 medium block"),
        ("SD3.5 large", "middle_heavy; J3[0-7]=1", ",".join(["0.5"] * 25), "expected 39 values for SD3.5 large"),
    ],
)
def test_a_blocks_axis_for_flux_and_sd3(family, accepted, refused, message):
    axis = parse_axis("blocks:alpha", accepted, "weighted_sum", family=family)
    assert axis.values == tuple(item.strip() for item in accepted.split(";"))
    with pytest.raises(RequestError, match=r"^sweep\.blocks:alpha: item 2 .*" + message):
        parse_axis("blocks:alpha", f"flat; {refused}", "weighted_sum", family=family)


def test_two_axes_come_row_major_with_y_outer():
    x = parse_axis("density", "0.2, 0.5, 0.8", "ties")
    y = parse_axis("lambda", "0.5, 1", "ties")
    points = plan_sweep(TIES, x, y)
    assert len(points) == 6
    assert [(p.x, p.y) for p in points] == [(0.2, 0.5), (0.5, 0.5), (0.8, 0.5), (0.2, 1.0), (0.5, 1.0), (0.8, 1.0)]
    assert [(p.column, p.row) for p in points] == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]
    assert [p.request.tree.params["density"] for p in points] == [0.2, 0.5, 0.8] * 2
    assert [p.request.tree.params["lambda"] for p in points] == [0.5] * 3 + [1.0] * 3
    assert points[4].label_x == "density = 0.5"
    assert points[4].label_y == "lambda = 1"
    assert point_name(points[4]) == "density 0.5, lambda 1"


def test_a_builtin_request_swept_on_alpha_keeps_its_models():
    points = plan_sweep(BUILTIN, parse_axis("alpha", "0.1:0.3:0.1", "Weighted sum"))
    assert [p.request.tree.params["alpha"] for p in points] == [0.1, 0.2, 0.3]
    for point in points:
        assert point.request.tree.method == "weighted_sum"
        assert point.request.tree.inputs == (ModelRef("a.safetensors"), ModelRef("b.safetensors"))
        assert point.y is None and point.label_y == ""
        assert point.request.primary_model_name == "a.safetensors"
    assert BUILTIN.tree is None
    assert point_name(points[0]) == "alpha 0.1"


def test_a_swept_scalar_replaces_the_value_and_drops_its_per_block_entry():
    points = plan_sweep(TIES, parse_axis("lambda", "0.5, 2", "ties"))
    assert [p.request.tree.params["lambda"] for p in points] == [0.5, 2.0]
    assert all("lambda" not in p.request.tree.blocks for p in points)
    assert all(p.request.tree.params["density"] == 0.2 for p in points)
    assert TIES.tree.blocks == {"lambda": "BASE=0,IN*=0.5"}  # the original request is untouched
    assert TIES.tree.params == {"density": 0.2, "lambda": 1.0}


def test_a_swept_scalar_keeps_other_parameters_per_block_entries():
    tree = MergeNode(TIES_TREE.method, TIES_TREE.inputs, TIES_TREE.params, {"lambda": "flat", "density": "flat"})
    points = plan_sweep(MergeRequest("base.safetensors", tree=tree), parse_axis("lambda", "0.5", "ties"))
    assert points[0].request.tree.blocks == {"density": "flat"}


def test_a_blocks_axis_sets_the_block_text_and_keeps_the_scalar():
    axis = parse_axis("blocks:lambda", "ramp_in_out; BASE=1,OUT*=0.25", "ties")
    points = plan_sweep(TIES, axis)
    assert [p.request.tree.blocks["lambda"] for p in points] == ["ramp_in_out", "BASE=1,OUT*=0.25"]
    assert all(p.request.tree.params == {"density": 0.2, "lambda": 1.0} for p in points)
    assert [p.label_x for p in points] == ["lambda blocks = ramp_in_out", "lambda blocks = BASE=1,OUT*=0.25"]
    assert [point_name(p) for p in points] == ["lambda blocks ramp_in_out", "lambda blocks #2"]


def test_every_point_round_trips_through_a_recipe_with_its_value():
    x = parse_axis("density", "0.1, 0.9", "ties")
    y = parse_axis("blocks:lambda", "middle_heavy; IN00=0.5", "ties")
    for point in plan_sweep(TIES, x, y):
        back = request_from_recipe(recipe_dict(point.request))
        assert back.root() == point.request.root()
        assert back.root().params["density"] == point.x
        assert back.root().blocks["lambda"] == point.y
        assert back.custom_name == "ties-out"
    builtin = plan_sweep(BUILTIN, parse_axis("alpha", "0.7", "Weighted sum"))[0]
    assert request_from_recipe(recipe_dict(builtin.request)).root().params == {"alpha": 0.7}


def test_both_axes_on_one_parameter_are_refused():
    alpha = parse_axis("alpha", "0.1, 0.2", "weighted_sum")
    with pytest.raises(RequestError, match=r"^sweep\.y: alpha sets alpha"):
        plan_sweep(BUILTIN, alpha, parse_axis("alpha", "0.5", "weighted_sum"))
    with pytest.raises(RequestError, match=r"^sweep\.y: blocks:alpha sets alpha"):
        plan_sweep(BUILTIN, alpha, parse_axis("blocks:alpha", "flat", "weighted_sum"))


def test_an_axis_for_another_method_is_refused_by_the_plan():
    with pytest.raises(RequestError, match=r"^sweep\.density: method weighted-sum has no such parameter"):
        plan_sweep(BUILTIN, parse_axis("density", "0.5", "ties"))
    with pytest.raises(RequestError, match=r"^sweep\.blocks:density: 'density' is not a per-block parameter"):
        plan_sweep(BUILTIN, SweepAxis("blocks:density", ("flat",)))


def test_values_out_of_range_in_a_hand_made_axis_are_refused_by_validation():
    with pytest.raises(RequestError, match=r"^merge\.params\.density: 0 is outside"):
        plan_sweep(TIES, SweepAxis("density", (0.5, 0.0)))


def test_an_axis_must_have_between_1_and_64_values():
    with pytest.raises(RequestError, match=r"^sweep\.alpha: no values"):
        SweepAxis("alpha", ())
    with pytest.raises(RequestError, match=r"^sweep\.alpha: 65 values"):
        SweepAxis("alpha", tuple(range(65)))
