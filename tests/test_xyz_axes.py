"""Merge Lab's axes in the webui's X/Y/Z plot, against the documented stand-in in tests/webui_standin.

The stand-in plot (xyz_grid_standin.py) is loaded the way the webui loads scripts
(modules/scripts.py stand-in), so the module search, the AxisOption signature and the run order
(confirm once, then apply before each generation) are those of webui v1.10.1's scripts/xyz_grid.py.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from lib_merge import MergeRequest
from lib_merge.arch import FLUX, FLUX_SCHNELL, SD1, SD3_MEDIUM, SD35_LARGE, SDXL
from lib_merge.errors import InputError, RequestError
from lib_merge.loop.xyz_axes import ALPHA, BLOCK_PRESET, LABELS, MERGE_COST, RECIPE, add_axes, find_xyz_module
from lib_merge.recipe import MergeNode, ModelRef, dump_recipe, recipe_dict, request_from_recipe

STANDIN = Path(__file__).parent / "webui_standin"
XYZ_FILE = STANDIN / "xyz_grid_standin.py"
BUILTINS = ["Nothing", "Seed", "CFG Scale", "Checkpoint name"]
BASE = MergeRequest("a.safetensors", "b.safetensors", interp_method="Weighted sum", multiplier=0.3)
TIES = MergeRequest(
    "base.safetensors",
    tree=MergeNode(
        "ties",
        (ModelRef("base.safetensors"), ModelRef("x.safetensors"), ModelRef("y.safetensors")),
        {"density": 0.2, "lambda": 1.0},
    ),
    custom_name="ties-out",
)
NO_BASE = "no merge to vary: Try a merge in the Merge Lab tab first"


class FakeSession:
    """Stands in for WebuiHost's session, which needs a loaded model: hands out a base request and
    records the requests the axes try, in order."""

    def __init__(self, base: MergeRequest | None = BASE, family: str = SD1, recipe_dir: Path | None = None):
        self._base, self._family, self._recipe_dir = base, family, recipe_dir
        self.tried: list[MergeRequest] = []
        self.fail_with: Exception | None = None

    def base(self) -> MergeRequest:
        if self._base is None:
            raise RequestError(NO_BASE)
        return self._base

    def try_request(self, request: MergeRequest) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.tried.append(request)

    def family(self) -> str:
        return self._family

    def recipe_dir(self) -> Path | None:
        return self._recipe_dir


@pytest.fixture
def webui(tmp_path, monkeypatch):
    """The stand-in ``modules.scripts`` with two loaded scripts: another one first, then the X/Y/Z plot."""
    for name in [n for n in sys.modules if n == "modules" or n.startswith("modules.")]:
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(STANDIN))
    scripts = importlib.import_module("modules.scripts")
    other = tmp_path / "other_script.py"
    other.write_text("import modules.scripts as scripts\n\nclass Script(scripts.Script):\n    pass\n")
    other = scripts.script_file(other)
    scripts.load_scripts([other, scripts.script_file(XYZ_FILE, "xyz_grid.py")])
    return SimpleNamespace(scripts=scripts, other=other)


@pytest.fixture
def xyz(webui):
    return find_xyz_module(webui.scripts.scripts_data)


def option(xyz, label: str):
    [found] = [opt for opt in xyz.axis_options if opt.label == label]
    return found


def p():
    return SimpleNamespace(prompt="a cat", cfg_scale=7.0, seed=1, override_settings={})


def test_the_plot_module_is_found_among_the_loaded_scripts(webui, xyz):
    entries = webui.scripts.scripts_data
    assert [Path(entry.path).name for entry in entries] == ["other_script.py", "xyz_grid_standin.py"]
    assert xyz is entries[1].module
    assert xyz.__name__ == "xyz_grid.py"
    assert xyz.Script().title() == "X/Y/Z plot"
    assert [opt.label for opt in xyz.axis_options] == BUILTINS


def test_without_the_plot_no_module_is_found(webui):
    scripts = webui.scripts
    scripts.load_scripts([webui.other])
    assert len(scripts.scripts_data) == 1
    assert find_xyz_module(scripts.scripts_data) is None
    assert find_xyz_module([]) is None


def test_the_three_axes_are_added_once_even_when_added_twice(xyz):
    first, second = FakeSession(), FakeSession()
    assert add_axes(xyz, first) == 3
    assert add_axes(xyz, second) == 0
    assert [opt.label for opt in xyz.axis_options] == BUILTINS + list(LABELS)
    # the newest session serves the axes (a UI reload hands a new one)
    option(xyz, ALPHA).apply(p(), 0.5, [0.5])
    assert (len(first.tried), len(second.tried)) == (0, 1)


def test_merge_axes_are_costlier_than_every_builtin_so_they_form_the_outer_loop(xyz):
    add_axes(xyz, FakeSession())
    builtin_costs = [opt.cost for opt in xyz.axis_options if opt.label in BUILTINS]
    assert max(builtin_costs) == 1.0
    assert all(option(xyz, label).cost == MERGE_COST > 1.0 for label in LABELS)
    assert option(xyz, ALPHA).type is float
    assert option(xyz, ALPHA).choices is None


def test_the_alpha_axis_tries_the_base_merge_with_each_alpha(xyz):
    session = FakeSession()
    add_axes(xyz, session)
    cells = xyz.run_cells(p(), option(xyz, ALPHA), ["0.2", "0.5"])
    assert [cell.label for cell in cells] == ["Merge Lab: alpha: 0.2", "Merge Lab: alpha: 0.5"]
    assert [r.root().params for r in session.tried] == [{"alpha": 0.2}, {"alpha": 0.5}]
    for tried in session.tried:
        assert tried.tree.method == "weighted_sum"
        assert tried.tree.inputs == (ModelRef("a.safetensors"), ModelRef("b.safetensors"))
        assert tried.primary_model_name == "a.safetensors"
    assert cells[0].processed["cfg_scale"] == 7.0  # the processing object is left alone
    assert BASE.tree is None and BASE.multiplier == 0.3


def test_an_alpha_from_a_float_range_is_tried_without_float_noise(xyz):
    session = FakeSession()
    add_axes(xyz, session)
    xyz.run_cells(p(), option(xyz, ALPHA), [0.1 + 0.2])  # numpy ranges give 0.30000000000000004
    assert session.tried[0].root().params["alpha"] == 0.3


@pytest.mark.parametrize(
    ("base", "values", "message"),
    [
        (BASE, ["0.2", "inf"], "Merge Lab: alpha: 'inf' refused: expected a finite number"),
        (BASE, ["0.2", "nan"], "Merge Lab: alpha: 'nan' refused: expected a finite number"),
        (TIES, ["0.5"], "Merge Lab: alpha: '0.5' refused: method ties has no such parameter (it can sweep: density"),
    ],
)
def test_a_bad_alpha_is_refused_before_any_merge(xyz, base, values, message):
    session = FakeSession(base)
    add_axes(xyz, session)
    with pytest.raises(RequestError) as caught:
        xyz.run_cells(p(), option(xyz, ALPHA), values)
    assert str(caught.value).startswith(message), str(caught.value)
    assert session.tried == []


def test_without_a_base_merge_the_axes_say_to_try_one_first(xyz):
    session = FakeSession(base=None)
    add_axes(xyz, session)
    for label, value in ((ALPHA, "0.5"), (BLOCK_PRESET, "flat")):
        with pytest.raises(RequestError) as caught:
            xyz.run_cells(p(), option(xyz, label), [value])
        assert str(caught.value) == f"{label}: {NO_BASE}"
    assert session.tried == []


def test_the_block_preset_axis_sets_the_per_block_alpha(xyz):
    session = FakeSession()
    add_axes(xyz, session)
    axis = option(xyz, BLOCK_PRESET)
    assert "ramp_in_out" in axis.choices() and "flat" in axis.choices()
    cells = xyz.run_cells(p(), axis, ["ramp_in_out", "flat"])
    assert [cell.label for cell in cells] == ["Merge Lab: block preset: ramp_in_out", "Merge Lab: block preset: flat"]
    assert [r.root().blocks for r in session.tried] == [{"alpha": "ramp_in_out"}, {"alpha": "flat"}]
    assert all(r.root().params == {"alpha": 0.3} for r in session.tried)


def test_a_block_list_is_checked_against_the_base_family(xyz):
    sdxl_list = ",".join(["0.5"] * 20)
    sdxl = FakeSession(family=SDXL)
    add_axes(xyz, sdxl)
    xyz.run_cells(p(), option(xyz, BLOCK_PRESET), [sdxl_list])
    assert sdxl.tried[0].root().blocks == {"alpha": sdxl_list}
    sd1 = FakeSession(family=SD1)
    add_axes(xyz, sd1)
    with pytest.raises(RequestError, match=r"^Merge Lab: block preset: '0\.5,.*' refused: expected 26 values for SD1"):
        xyz.run_cells(p(), option(xyz, BLOCK_PRESET), [sdxl_list])
    assert sd1.tried == []


@pytest.mark.parametrize(
    ("family", "block"), [(FLUX, "S*"), (FLUX_SCHNELL, "D07"), (SD3_MEDIUM, "J*"), (SD35_LARGE, "J37")]
)
def test_presets_and_block_names_resolve_for_flux_and_sd3(xyz, family, block):
    session = FakeSession(family=family)
    add_axes(xyz, session)
    xyz.run_cells(p(), option(xyz, BLOCK_PRESET), ["out_heavy", f"ramp_in_out,{block}=0.9"])
    assert [r.root().blocks for r in session.tried] == [{"alpha": "out_heavy"}, {"alpha": f"ramp_in_out,{block}=0.9"}]
    with pytest.raises(
        RequestError, match=rf"^Merge Lab: block preset: 'IN04=0\.3' refused: 'IN04' matches no {family} block"
    ):
        xyz.run_cells(p(), option(xyz, BLOCK_PRESET), ["IN04=0.3"])


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("ramp_in_ou", "Merge Lab: block preset: 'ramp_in_ou' refused: 'ramp_in_ou' is not a number or a preset ("),
        ("flat; in_heavy", "Merge Lab: block preset: 'flat; in_heavy' refused: one value per cell, got 2"),
    ],
)
def test_an_unknown_preset_is_refused_naming_it(xyz, value, message):
    session = FakeSession()
    add_axes(xyz, session)
    with pytest.raises(RequestError) as caught:
        xyz.run_cells(p(), option(xyz, BLOCK_PRESET), ["flat", value])
    assert str(caught.value).startswith(message), str(caught.value)
    assert session.tried == []


@pytest.fixture
def recipes(tmp_path):
    """A recipe folder with a YAML recipe (TIES over three models), a JSON one and a non-recipe file."""
    folder = tmp_path / "recipes"
    folder.mkdir()
    ties = folder / "ties-recipe.yaml"
    ties.write_text(dump_recipe(recipe_dict(TIES), ties))
    plain = folder / "Plain.json"
    plain.write_text(dump_recipe(recipe_dict(BASE), plain))
    (folder / "notes.txt").write_text("not a recipe")
    return folder


def test_the_recipe_axis_offers_and_tries_the_saved_recipes(xyz, recipes):
    session = FakeSession(base=None, recipe_dir=recipes)  # a recipe is a whole merge: no base needed
    add_axes(xyz, session)
    axis = option(xyz, RECIPE)
    assert axis.choices() == ["Plain.json", "ties-recipe.yaml"]
    cells = xyz.run_cells(p(), axis, ["ties-recipe", "Plain.json"])
    assert [cell.label for cell in cells] == ["Merge Lab: recipe: ties-recipe", "Merge Lab: recipe: Plain"]
    ties, plain = session.tried
    assert ties.root() == TIES.root()
    assert ties.root().params == {"density": 0.2, "lambda": 1.0}
    assert ties.custom_name == "ties-out"
    assert plain == request_from_recipe(recipe_dict(BASE))
    assert plain.root().params == {"alpha": 0.3}


def test_without_a_recipe_folder_the_recipe_axis_refuses_every_value(xyz, recipes):
    session = FakeSession(recipe_dir=None)
    add_axes(xyz, session)
    axis = option(xyz, RECIPE)
    assert axis.choices is None
    with pytest.raises(RequestError, match="no recipe folder"):
        xyz.run_cells(p(), axis, [str(recipes / "ties-recipe.yaml")])
    assert session.tried == []


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("ABSOLUTE", "absolute paths are not accepted"),
        ("../outside.yaml", "'..' is not accepted"),
        ("sub/../../outside", "'..' is not accepted"),
    ],
)
def test_the_recipe_axis_reads_nothing_outside_its_folder(xyz, recipes, value, message):
    """A real recipe file beside the folder, named by an absolute path or through '..', is refused unread."""
    outside = recipes.parent / "outside.yaml"
    outside.write_text(dump_recipe(recipe_dict(TIES), outside))
    value = str(outside) if value == "ABSOLUTE" else value
    session = FakeSession(recipe_dir=recipes)
    add_axes(xyz, session)
    with pytest.raises(RequestError) as caught:
        xyz.run_cells(p(), option(xyz, RECIPE), [value])
    assert str(caught.value).startswith("Merge Lab: recipe: ") and message in str(caught.value), str(caught.value)
    assert session.tried == []


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("missing.yaml", "Merge Lab: recipe: 'missing.yaml': no such recipe file (looked in "),
        ("notes.txt", "Merge Lab: recipe: 'notes.txt': not a recipe file (expected .yaml, .yml, .json)"),
        ("broken", "Merge Lab: recipe: 'broken': recipe.merge_lab_recipe: version 9 is not supported"),
    ],
)
def test_a_missing_or_bad_recipe_file_is_refused_naming_it(xyz, recipes, value, message):
    (recipes / "broken.json").write_text('{"merge_lab_recipe": 9, "merge": {}}')
    session = FakeSession(recipe_dir=recipes)
    add_axes(xyz, session)
    with pytest.raises(RequestError) as caught:
        xyz.run_cells(p(), option(xyz, RECIPE), ["ties-recipe", value])
    assert str(caught.value).startswith(message), str(caught.value)
    assert session.tried == []


def test_a_failed_merge_keeps_its_error_class_and_names_the_axis_and_value(xyz):
    session = FakeSession()
    session.fail_with = InputError("b.safetensors: no such checkpoint")
    add_axes(xyz, session)
    with pytest.raises(InputError) as caught:
        xyz.run_cells(p(), option(xyz, ALPHA), ["0.4"])
    assert str(caught.value) == "Merge Lab: alpha: '0.4': b.safetensors: no such checkpoint"
