"""The tab's structure, built with the real gradio over a FolderHost (no browser needed for these)."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio")

from lib_merge.ui import compat  # noqa: E402
from lib_merge.ui import tab as tab_module  # noqa: E402

REQUIRED_IDS = {
    "merge_lab_primary", "merge_lab_secondary", "merge_lab_tertiary", "merge_lab_method", "merge_lab_multiplier",
    "merge_lab_custom_name", "merge_lab_merge", "merge_lab_result",
}  # fmt: skip


def components(blocks) -> list[dict]:
    return [c for c in blocks.config["components"] if c.get("type") not in ("row", "column", "form", "group", "state")]


@pytest.mark.gradio_both
def test_every_control_has_a_stable_merge_lab_id(host):
    blocks = tab_module.build_tab(host)
    ids = [c["props"].get("elem_id") for c in components(blocks)]
    assert set(ids) >= REQUIRED_IDS
    unnamed = [c["type"] for c in components(blocks) if not c["props"].get("elem_id")]
    assert unnamed == []
    assert all(elem_id.startswith("merge_lab_") for elem_id in ids)
    assert len(ids) == len(set(ids)), "an elem_id is used twice"


@pytest.mark.gradio_both
def test_standalone_hides_what_needs_a_webui(host):
    props = {c["props"].get("elem_id"): c["props"] for c in components(tab_module.build_tab(host))}
    assert props["merge_lab_load"]["visible"] is False and props["merge_lab_load"]["value"] is False
    assert props["merge_lab_merge_open"]["visible"] is False
    names = ["a.safetensors", "b.safetensors", "c.safetensors"]
    # gradio 3.41 lists names, or [name, value] pairs; gradio 4 (name, value) tuples.
    choices = [
        list(choice) if isinstance(choice, (list, tuple)) else choice
        for choice in props["merge_lab_primary"]["choices"]
    ]
    assert choices in (names, [[name, name] for name in names])


@pytest.mark.gradio_both
def test_the_ui_code_uses_only_apis_gradio_4_still_has():
    source = "\n".join(p.read_text() for p in Path(tab_module.__file__).parent.glob("*.py"))
    assert not re.search(r"gr\.\w+\.update\(", source), "component .update class methods are gone in gradio 4"
    assert not re.search(r"\b_?js=", source), "a page script is passed only through compat.page_hook (_js or js)"
    assert not re.search(r"gr\.Box\b|\.style\(|\bsource=|\bevery=", source), "gradio 3 only"


@pytest.mark.gradio_both
def test_every_page_hook_reaches_the_page_in_this_gradio(host):
    """In the webui each event the page script hooks carries it (gradio 3 takes ``_js``, 4 ``js``);
    the standalone page has no script, so no event names one."""
    hooks = ["mergeLabMerge", "mergeLabOpenTxt2img", "mergeLabTask", "mergeLabSweep", "mergeLabFromTxt2img"]
    hooks += ["mergeLabTask"] * 3  # the greedy soup's Start, Keep soup and Add candidate
    hooks += ["mergeLabTask"] * 2 + ["mergeLabSweep"]  # the LoRA section's Bake, Try bake, Sweep bake
    hooks += ["mergeLabTask"] * 2  # and its Extract and Merge LoRAs
    for in_webui, expected in ((True, hooks), (False, [])):
        config = tab_module.build_tab(host, in_webui=in_webui).config
        assert [d["js"] for d in config["dependencies"] if d.get("js")] == expected


def _uploaded_value(component, path: Path):
    """What this gradio hands the Load recipe event for a file the page uploaded to ``path``."""
    if compat.GRADIO_4:
        from gradio.data_classes import FileData

        return component.preprocess(FileData(path=str(path), orig_name=path.name))
    return component.preprocess({"name": str(path), "orig_name": path.name, "data": None, "is_file": True})


@pytest.fixture
def uploads():
    """A folder inside gradio's upload folder, as a page's upload lands in, removed after the test."""
    inside = compat.upload_folders(gr.UploadButton("Load recipe"))[0]
    inside.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="merge-lab-test-", dir=inside))
    yield folder
    shutil.rmtree(folder)


@pytest.mark.gradio_both
def test_load_recipe_takes_this_gradios_upload_and_refuses_a_path_from_elsewhere(tmp_path, uploads):
    """gradio 3 gives a temp file wrapper (.name, .orig_name), gradio 4 a path string: both load, and a
    value naming a file outside gradio's upload folder is refused, whichever shape it has."""
    from lib_merge.ui import method_controls

    button = gr.UploadButton("Load recipe")
    folders = compat.upload_folders(button)
    recipe = uploads / "recipe.yaml"
    recipe.write_text("merge: {method: soup, models: [a.safetensors, b.safetensors]}\n")
    value = _uploaded_value(button, recipe)
    *_, note, loading = method_controls.load_recipe(value, ("interp_method",), "Weighted sum", folders)
    assert note == "Recipe loaded." and loading["interp_method"] == "Model soup"

    secret = tmp_path / "secret.yaml"
    secret.write_text(recipe.read_text().replace("a.safetensors", "SECRET.safetensors"))
    # What the component hands the event when a client names ``secret`` as its upload (gradio 3
    # copies it into the upload folder first; gradio 4's route refuses it before, this is the second wall).
    for shape in (_uploaded_value(button, secret), str(secret), None):
        *_, note, loading = method_controls.load_recipe(shape, ("interp_method",), "Weighted sum", folders)
        assert note.startswith("Could not load the recipe: recipe: not a file uploaded") and loading is None


GREEDY_IDS = {
    "merge_lab_greedy", "merge_lab_greedy_candidates", "merge_lab_greedy_prompts", "merge_lab_greedy_scorer",
    "merge_lab_greedy_start", "merge_lab_greedy_keep", "merge_lab_greedy_add", "merge_lab_greedy_save",
    "merge_lab_greedy_soup", "merge_lab_greedy_candidate",
}  # fmt: skip


@pytest.mark.gradio_both
def test_the_greedy_soup_is_hidden_in_the_standalone_app_and_shown_with_a_loaded_model(host, models, tmp_path):
    from image_host import ImageHost

    for shown_host, visible in ((host, False), (ImageHost(models, tmp_path / "grids"), True)):
        props = {c["props"].get("elem_id"): c["props"] for c in components(tab_module.build_tab(shown_host))}
        assert set(props) >= GREEDY_IDS
        assert props["merge_lab_greedy"]["visible"] is visible
        assert props["merge_lab_greedy_keep"]["interactive"] is False  # nothing to pick before Start


# The sweep's image fields as gradio gives them (numbers as floats).
GREEDY_IMAGE = {"prompt": "", "negative_prompt": "", "seed": 5.0, "steps": 20.0, "width": 4.0, "height": 4.0,
                "sampler": "", "cfg_scale": 7.0}  # fmt: skip


class TestGreedyHandlers:
    """The greedy soup's events over a host with a loaded model: Start, the picks, Save soup."""

    OUTPUTS = ("soup", "candidate", "result", "walk", "recipe", "keep", "add", "save")

    @pytest.fixture
    def image_host(self, models, tmp_path):
        from image_host import ImageHost

        host = ImageHost(models, tmp_path / "grids", hash_cache=tmp_path / "hashes.json")
        host.can_run_code = True  # a webui that allows installing extensions (the default, on localhost)
        return host

    def start(self, image_host, candidates, scorer=""):
        from lib_merge.ui import experiments

        prompts = "a cat\n\n a dog "  # blank lines and spaces around a prompt are dropped
        out = experiments.start_greedy(image_host, candidates, prompts, scorer, GREEDY_IMAGE, "", "page", _no_progress)
        return dict(zip(self.OUTPUTS, out, strict=True))

    def test_picking_builds_the_soup_and_save_writes_the_path(self, image_host):
        from lib_merge.io.formats import open_checkpoint
        from lib_merge.ui import experiments

        out = self.start(image_host, ["b.safetensors", "a.safetensors", "c.safetensors"])
        assert [caption for _, caption in out["soup"]] == ["a cat", "a dog"] and len(out["candidate"]) == 2
        assert "step 1 of 2 (seed 5): b.safetensors beside + a.safetensors" in out["result"]
        assert out["keep"]["interactive"] and out["add"]["interactive"] and not out["save"]["interactive"]
        state = out["walk"]
        assert json.loads(json.dumps(state)) == state and out["recipe"] is None

        out = dict(zip(self.OUTPUTS, experiments.decide_greedy(image_host, state, True, "", "page"), strict=True))
        assert "step 2 of 2" in out["result"] and out["walk"]["walk"]["decisions"] == [True]
        out = dict(
            zip(self.OUTPUTS, experiments.decide_greedy(image_host, out["walk"], False, "", "page"), strict=True)
        )
        assert "Greedy soup: b.safetensors + a.safetensors" in out["result"]
        assert not out["keep"]["interactive"] and out["save"]["interactive"]
        path = out["recipe"]["greedy_soup"]
        assert path["scorer"] == "user" and path["prompts"] == ["a cat", "a dog"] and path["seed"] == 5

        saved = experiments.save_recipe_file(image_host, out["recipe"], "find a greedy soup", "page")
        assert "merge-lab-done" in saved
        [file] = image_host.models_dir.glob("soup(*")
        with open_checkpoint(file) as reader:
            assert json.loads(reader.metadata["sd_merge_recipe"])["merge_lab_recipe"]["greedy_soup"] == path

    def test_a_named_scorer_runs_to_the_end(self, image_host, tmp_path, monkeypatch):
        (tmp_path / "merge_lab_tab_scorer.py").write_text("def score(images, prompts):\n    return 1.0\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        out = self.start(image_host, ["b.safetensors", "a.safetensors"], "merge_lab_tab_scorer:score")
        assert "Greedy soup: b.safetensors + a.safetensors" in out["result"]  # a tie keeps the candidate
        assert out["recipe"]["greedy_soup"]["scorer"] == "merge_lab_tab_scorer:score" and out["save"]["interactive"]
        assert len(out["soup"]) == 2 and out["candidate"] == []

    def test_a_scorer_is_never_imported_where_the_host_allows_no_code(self, image_host, tmp_path, monkeypatch):
        """As the webui with --listen (extensions cannot be installed), or the standalone app."""
        marker = tmp_path / "imported"
        module = tmp_path / "merge_lab_refused_scorer.py"
        module.write_text(f"open({str(marker)!r}, 'w').close()\ndef score(images, prompts):\n    return 1.0\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        image_host.can_run_code = False
        out = self.start(image_host, ["b.safetensors", "a.safetensors"], "merge_lab_refused_scorer:score")
        assert "merge-lab-error" in out["result"] and "scorer: naming code to run is off here" in out["result"]
        assert not marker.exists() and image_host.generated == []

    @pytest.mark.parametrize("code", ["raise SystemExit(3)", "raise KeyboardInterrupt", "import sys; sys.exit()"])
    def test_a_scorer_that_exits_is_an_error_and_the_server_lives_on(self, image_host, tmp_path, monkeypatch, code):
        name = f"merge_lab_exiting_scorer_{abs(hash(code))}"
        (tmp_path / f"{name}.py").write_text(f"def score(images, prompts):\n    {code}\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        out = self.start(image_host, ["b.safetensors", "a.safetensors"], f"{name}:score")
        assert "merge-lab-error" in out["result"] and f"scorer: {name}:score failed" in out["result"]
        assert not image_host.interrupt("page")  # the job ended: nothing is left holding the host

    @pytest.mark.parametrize(
        ("candidates", "scorer", "message"),
        [
            (["a.safetensors"], "", "greedy_soup.candidates: a soup needs at least 2 candidates"),
            (None, "", "greedy_soup.candidates: a soup needs at least 2 candidates"),
            (["a.safetensors", "b.safetensors"], "nowhere", "scorer: expected package.module:function"),
        ],
    )
    def test_errors_are_shown_not_raised(self, image_host, candidates, scorer, message):
        out = self.start(image_host, candidates, scorer)
        assert "merge-lab-error" in out["result"] and message in out["result"]
        assert out["walk"] is None and not out["keep"]["interactive"] and not out["save"]["interactive"]

    @pytest.mark.gradio_both  # gr.update() compared as gradio gives it
    def test_a_pick_that_fails_keeps_the_walk(self, image_host):
        from lib_merge.ui import experiments

        state = self.start(image_host, ["a.safetensors", "b.safetensors", "c.safetensors"])["walk"]
        image_host.stop_after_images = len(image_host.generated)  # Cancel pressed: the next image stops
        out = dict(zip(self.OUTPUTS, experiments.decide_greedy(image_host, state, True, "", "page"), strict=True))
        assert "merge-lab-error" in out["result"] and "cancelled" in out["result"]
        assert out["walk"] == gr.update() and out["keep"]["interactive"]  # the same pick can be made again
        assert "Start a greedy soup first" in experiments.decide_greedy(image_host, None, True, "", "page")[2]


def _no_progress(*args, **kwargs):
    pass
