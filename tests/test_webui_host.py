"""WebuiHost's contract with the webui, against the documented stand-in in tests/webui_standin.

The stand-in is the one mock in this suite: the webui cannot be installed from a registry. What it
copies from webui v1.10.1 is listed in its package docstring; tests/test_webui_e2e.py checks the same
adapter in a real webui when MERGE_LAB_WEBUI is set.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import make

from lib_merge import actions
from lib_merge.errors import CancelledError, InputError, RequestError
from lib_merge.loop import xyz_axes

STANDIN = Path(__file__).parent / "webui_standin"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def webui(tmp_path, monkeypatch):
    """A fresh stand-in webui whose checkpoint folder (--ckpt-dir) holds a.safetensors and b.safetensors."""
    for name in [n for n in sys.modules if n == "modules" or n.startswith("modules.")] + ["lib_merge.hosts.webui"]:
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(STANDIN))
    folder = tmp_path / "Stable-diffusion"
    make(folder / "a.safetensors", seed=1)
    make(folder / "b.safetensors", seed=2)
    modules = SimpleNamespace(
        **{
            name: importlib.import_module(f"modules.{name}")
            for name in ("shared", "sd_models", "hashes", "progress", "call_queue", "sd_vae", "cache", "devices")
        }
    )
    modules.shared.cmd_opts.ckpt_dir = str(folder)
    modules.sd_models.list_models()
    modules.folder = folder
    modules.host_module = importlib.import_module("lib_merge.hosts.webui")
    yield modules
    # the webui_host module object must not outlive its stand-in modules in sys.modules
    monkeypatch.delitem(sys.modules, "lib_merge.hosts.webui", raising=False)


@pytest.fixture
def host(webui):
    return webui.host_module.WebuiHost()


def request(**fields):
    base = {"primary_model_name": "a.safetensors", "secondary_model_name": "b.safetensors", "multiplier": 0.5}
    return actions.request_from_fields({**base, **fields})[0]


def test_checkpoints_are_the_webuis_titles_and_resolve_by_title_or_name(host, webui):
    titles = host.checkpoints()
    assert titles == webui.sd_models.checkpoint_tiles()
    for title in titles:
        assert host.resolve(title).path.parent == webui.folder
    assert host.resolve("a.safetensors").path == webui.folder / "a.safetensors"
    with pytest.raises(InputError, match="'?a.safe'?: not in the webui's checkpoint list"):
        host.resolve("a.safe")  # no substring guesses


def test_a_merge_is_registered_with_the_writers_hash_and_never_read_again(host, webui):
    outcome = actions.run_merge(host, request(), load=False)
    path = webui.folder / "0.5(a) + 0.5(b).safetensors"
    assert outcome.path == path and path.is_file()
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    assert outcome.sha256 == sha256
    assert webui.cache.cache("hashes")["checkpoint/0.5(a) + 0.5(b).safetensors"]["sha256"] == sha256
    assert outcome.title == f"0.5(a) + 0.5(b).safetensors [{sha256[:10]}]"
    assert outcome.title in webui.sd_models.checkpoint_tiles()
    assert str(path.resolve()) not in webui.hashes.calculated
    assert webui.cache.dumps >= 1


def test_load_switches_the_webuis_model_through_its_setting_under_the_queue_lock(host, webui):
    lock_held = []
    real_reload = webui.sd_models.reload_model_weights

    def reload(*args, **kwargs):
        lock_held.append(webui.call_queue.queue_lock.held())
        return real_reload(*args, **kwargs)

    webui.sd_models.reload_model_weights = reload
    outcome = actions.run_merge(host, request(), load=True)
    assert outcome.loaded
    assert webui.shared.opts.sd_model_checkpoint == outcome.title
    assert webui.sd_models.reloads == [outcome.title] and lock_held == [True]
    assert webui.shared.opts.saved[-1][1]["sd_model_checkpoint"] == outcome.title


def test_loading_the_file_a_merge_is_tried_on_reloads_it_from_the_file(host, webui, monkeypatch):
    """The webui keeps a model whose file name matches; a tried merge's does, so load forces a reload."""
    title = host.load("a.safetensors")
    tried_info = SimpleNamespace(merge_lab_tried=(request(), None))
    monkeypatch.setattr(webui.shared, "sd_model", SimpleNamespace(sd_checkpoint_info=tried_info), raising=False)
    assert host.tried_request() == request()
    assert host.load("a.safetensors") == title
    assert webui.sd_models.reloads[-2:] == [title, f"forced {title}"]
    assert host.tried_request() is None
    host.load("a.safetensors")
    assert not webui.sd_models.reloads[-1].startswith("forced")  # a checkpoint as loaded is kept


def test_a_failed_load_keeps_the_file_restores_the_setting_and_says_why(host, webui):
    webui.shared.opts.data["sd_model_checkpoint"] = "a.safetensors"
    webui.sd_models.fail_next_reload = True
    outcome = actions.run_merge(host, request(), load=True)
    assert outcome.path.is_file() and not outcome.loaded
    assert webui.shared.opts.sd_model_checkpoint == "a.safetensors"
    assert any("not loaded" in note and "out of memory" in note for note in outcome.notes)


def test_a_merge_is_a_webui_job_with_a_task_id_and_steps(host, webui):
    seen = []

    def snapshot(_update):
        state = webui.shared.state
        seen.append((state.job, state.sampling_step, state.sampling_steps, webui.progress.current_task))

    actions.run_merge(host, request(), load=False, task_id="task(abc)", on_progress=snapshot)
    assert seen and all(job == "merge-lab" and task == "task(abc)" for job, _, _, task in seen)
    steps = [step for _, step, _, _ in seen]
    assert steps == sorted(steps) and steps[-1] == seen[-1][2] > 0
    assert webui.progress.finished_tasks[-1] == "task(abc)" and webui.progress.current_task is None
    assert webui.shared.state.job == "" and not webui.call_queue.queue_lock.held()


def test_cancel_interrupts_the_merge_only_and_leaves_no_file(host, webui):
    assert not host.interrupt("page-1")  # no merge running: a generation in progress must not be stopped
    assert not webui.shared.state.interrupted

    def cancels(_update):
        assert not host.interrupt("page-2")  # another page's Cancel: not its merge
        assert not webui.shared.state.interrupted
        assert host.interrupt("page-1")

    with pytest.raises(CancelledError):
        actions.run_merge(host, request(), load=False, owner="page-1", on_progress=cancels)
    assert sorted(p.name for p in webui.folder.iterdir()) == ["a.safetensors", "b.safetensors"]
    assert not webui.shared.state.interrupted and not webui.call_queue.queue_lock.held()


def test_output_goes_to_the_ckpt_dir_or_the_webuis_model_folder(host, webui):
    assert host.output_dir() == webui.folder
    webui.shared.cmd_opts.ckpt_dir = None
    assert host.output_dir() == Path(webui.sd_models.model_path)


def test_settings_are_registered_and_the_device_setting_wins(host, webui):
    webui.host_module.on_ui_settings()
    options = webui.shared.opts.data_labels
    assert {"merge_lab_load_default", "merge_lab_device"} <= set(options)
    assert all(
        options[key].section == ("merge_lab", "Merge Lab") for key in ("merge_lab_load_default", "merge_lab_device")
    )
    assert host.device() == "cpu" and host.load_by_default is True
    webui.shared.opts.data["merge_lab_device"] = "cuda:1"
    webui.shared.opts.data["merge_lab_load_default"] = False
    assert host.device() == "cuda:1" and host.devices()[0] == "cuda:1"
    assert host.load_by_default is False


def test_vaes_come_from_the_webuis_vae_list(host, webui, tmp_path):
    vae = tmp_path / "kl-f8.safetensors"
    webui.sd_vae.vae_dict["kl-f8.safetensors"] = str(vae)
    host.refresh()
    assert host.vaes() == ["kl-f8.safetensors"] and host.vae_path("kl-f8.safetensors") == vae
    assert host.vae_path("Automatic") is None and webui.sd_vae.refreshes == 1


def test_api_auth_is_read_from_the_webuis_flag(host, webui):
    assert host.api_auth() == {}
    webui.shared.cmd_opts.api_auth = "one:pw1,two:p:w2"
    assert host.api_auth() == {"one": "pw1", "two": "p:w2"}


def test_the_entry_script_registers_the_tab_the_settings_and_the_routes(webui):
    pytest.importorskip("gradio")
    fastapi = pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    callbacks = importlib.import_module("modules.script_callbacks")
    runpy.run_path(str(ROOT / "scripts" / "merge_lab.py"))
    assert {name: len(found) for name, found in callbacks.registered.items()} == {
        "ui_tabs": 1, "ui_settings": 1, "app_started": 1, "before_ui": 1,
    }  # fmt: skip

    [(blocks, label, tab_id)] = callbacks.registered["ui_tabs"][0]()
    assert (label, tab_id) == ("Merge Lab", "merge_lab")
    elem_ids = {c.get("props", {}).get("elem_id") for c in blocks.config["components"]}
    assert {"merge_lab_primary", "merge_lab_merge_open", "merge_lab_load"} <= elem_ids
    page_hooks = {dependency.get("js") for dependency in blocks.config["dependencies"]} - {None}
    assert {
        "mergeLabMerge",
        "mergeLabOpenTxt2img",
        "mergeLabTask",
        "mergeLabSweep",
        "mergeLabFromTxt2img",
    } <= page_hooks
    script = (ROOT / "javascript" / "merge_lab.js").read_text()
    assert all(f"function {hook}(" in script for hook in page_hooks)  # every hook the page is told to call exists

    scripts = importlib.import_module("modules.scripts")
    scripts.load_scripts([scripts.script_file(STANDIN / "xyz_grid_standin.py", "xyz_grid.py")])
    callbacks.registered["before_ui"][0]()
    xyz = scripts.scripts_data[0].module
    assert [o.label for o in xyz.axis_options if o.label.startswith("Merge Lab")] == list(xyz_axes.LABELS)

    webui.shared.cmd_opts.api_auth = "user:pw"
    app = fastapi.FastAPI()
    callbacks.registered["app_started"][0](None, app)
    client = TestClient(app)
    assert client.get("/merge-lab/v1/models").status_code == 401
    listed = client.get("/merge-lab/v1/models", auth=("user", "pw")).json()
    assert [entry["architecture"] for entry in listed] == ["SD1", "SD1"]


@pytest.mark.parametrize("custom_name", ["../escaped", "/tmp/escaped", "sub/escaped", "..", "a\x00b"])
def test_a_custom_name_is_a_file_name_in_the_checkpoint_folder_only(host, webui, tmp_path, custom_name):
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(RequestError, match="custom_name"):
        actions.run_merge(host, request(custom_name=custom_name), load=False)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_names_outside_the_webuis_lists_are_refused(host, webui, tmp_path):
    make(tmp_path / "secret.safetensors", seed=3)
    for name in (str(tmp_path / "secret.safetensors"), "../secret.safetensors"):
        with pytest.raises(InputError, match="not in the webui's checkpoint list"):
            actions.run_merge(host, request(secondary_model_name=name), load=False)
    with pytest.raises(RequestError, match="bake_in_vae: no VAE named"):
        actions.run_merge(host, request(bake_in_vae=str(tmp_path / "secret.safetensors")), load=False)


def test_a_scorer_may_run_only_where_the_webui_allows_installing_extensions(host, webui):
    webui.shared.cmd_opts.disable_extension_access = False  # localhost, the webui's default
    assert host.can_run_code
    webui.shared.cmd_opts.disable_extension_access = True  # --listen without --enable-insecure-extension-access
    assert not host.can_run_code


def test_the_webuis_start_removes_temp_files_of_killed_merges_only(webui, tmp_path):
    fastapi = pytest.importorskip("fastapi")
    leftover = webui.folder / ".killed.safetensors.0123abcd.merge-lab.tmp"
    leftover.write_bytes(b"\0" * 1024)  # no process holds its lock: its merge is gone
    webui.host_module.on_app_started(None, fastapi.FastAPI())
    assert not leftover.exists()
    assert sorted(p.name for p in webui.folder.iterdir()) == ["a.safetensors", "b.safetensors"]


def test_api_auth_takes_non_ascii_passwords(host, webui):
    fastapi = pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    webui.shared.cmd_opts.api_auth = "jörg:grüße:ß"
    app = fastapi.FastAPI()
    webui.host_module.on_app_started(None, app)
    client = TestClient(app)
    token = base64.b64encode("jörg:grüße:ß".encode()).decode()
    assert client.get("/merge-lab/v1/models", headers={"Authorization": f"Basic {token}"}).status_code == 200
    wrong = base64.b64encode("jörg:grüsse:ß".encode()).decode()
    assert client.get("/merge-lab/v1/models", headers={"Authorization": f"Basic {wrong}"}).status_code == 401
