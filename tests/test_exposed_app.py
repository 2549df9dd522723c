"""The standalone app attacked over HTTP as whoever reaches it would: the real `python -m lib_merge.app`
in a subprocess, real checkpoint files, requests sent with httpx.

Each attack must answer a 4xx (or a one-line refusal), read and write nothing outside the app's
folders, and leave the server answering everyone else meanwhile.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import make

ROOT = Path(__file__).resolve().parents[1]
API = "/merge-lab/v1"
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def app(models: Path, *args: str, cwd: Path | None = None):
    """The app serving ``models``; yields its base URL and stops it after the block."""
    port = free_port()
    env = {**os.environ, "XDG_CACHE_HOME": str(models.parent / "cache"), "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen(
        [sys.executable, "-m", "lib_merge.app", "--models", str(models), "--port", str(port), *args],
        cwd=cwd or ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        seen = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = server.stdout.readline()
            seen.append(line)
            if line.startswith("Merge Lab: http://"):
                break
            if not line and server.poll() is not None:
                raise AssertionError("the app did not start:\n" + "".join(seen))
        while time.monotonic() < deadline:  # the announcement comes just before the port is open
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A models folder with A and B, and beside it what an attacker would like to reach: a secret
    checkpoint, a checkpoint to overwrite, a VAE and a recipe, all outside the folder."""
    root = tmp_path_factory.mktemp("exposed")
    models = root / "models"
    make(models / "a.safetensors", seed=1)
    make(models / "b.safetensors", seed=2)
    outside = root / "outside"
    make(outside / "secret.safetensors", seed=3, metadata={"secret": "SECRET-METADATA"})
    make(outside / "victim.safetensors", seed=4)
    make(outside / "vae.safetensors", seed=5)
    return root, models, outside


@pytest.fixture(scope="module")
def served(world):
    root, models, _ = world
    with app(models, cwd=root) as url:
        yield url


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` (and at the filesystem root) with its size and mtime."""
    files = {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}
    files.update({str(p): (0, 0) for p in Path("/").glob("*.safetensors")})
    return files


def post(url: str, path: str, body: dict, **options) -> httpx.Response:
    return httpx.post(url + API + path, json=body, timeout=options.pop("timeout", 60), **options)


def merge_body(**change) -> dict:
    return {"primary_model_name": "a.safetensors", "secondary_model_name": "b.safetensors", **change}


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"custom_name": "../outside/x"}, "custom_name"),
        ({"custom_name": "OUTSIDE/victim", "overwrite": True}, "custom_name"),
        ({"custom_name": "/"}, "custom_name"),
        ({"custom_name": "/tmp/x"}, "custom_name"),
        ({"custom_name": ".."}, "custom_name"),
        ({"custom_name": "a\x00b"}, "custom_name"),
        ({"custom_name": "x" * 250}, "custom_name"),
        ({"custom_name": "é" * 110}, "custom_name"),
        ({"custom_name": "two\nlines"}, "custom_name"),
        ({"primary_model_name": "OUTSIDE/secret.safetensors", "multiplier": 1.0}, "primary_model_name"),
        ({"secondary_model_name": "../outside/secret.safetensors", "multiplier": 0.0}, "secondary_model_name"),
        ({"secondary_model_name": "/etc/passwd"}, "secondary_model_name"),
        ({"secondary_model_name": "../../../../etc/hostname.safetensors"}, "secondary_model_name"),
        ({"secondary_model_name": "a.safetensors\x00.txt"}, "secondary_model_name"),
        ({"bake_in_vae": "OUTSIDE/vae.safetensors"}, "bake_in_vae"),
        ({"bake_in_vae": "../outside/vae.safetensors"}, "bake_in_vae"),
        ({"multiplier": int("1" + "0" * 400)}, "multiplier"),
        ({"device": "meta"}, "device"),
        ({"device": "cuda:x"}, "device"),
        ({"metadata_json": json.dumps({"big": "x" * 2_000_000})}, "metadata_json"),
    ],
)
def test_names_and_values_from_a_request_stay_inside_the_folders(world, served, change, named):
    root, _, outside = world
    change = {k: v.replace("OUTSIDE", str(outside)) if isinstance(v, str) else v for k, v in change.items()}
    before = snapshot(root)
    response = post(served, "/merge", merge_body(**change))
    assert 400 <= response.status_code < 500, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and named in detail and "\n" not in detail, detail
    assert "Traceback" not in detail and "SECRET" not in detail
    assert snapshot(root) == before  # nothing written, nothing replaced, nothing at /


def test_a_recipe_names_nothing_outside_the_folders_either(world, served):
    root, _, outside = world
    before = snapshot(root)
    recipes = [
        {"merge": {"method": "soup", "models": ["a.safetensors", str(outside / "secret.safetensors")]}},
        {"merge": {"method": "soup", "models": ["a.safetensors", "../outside/secret.safetensors"]}},
        {"merge": {"method": "soup", "models": ["a.safetensors", "b.safetensors"]}, "output": {"custom_name": "../x"}},
        {
            "merge": {"method": "soup", "models": ["a.safetensors", "b.safetensors"]},
            "output": {"bake_in_vae": str(outside / "vae.safetensors")},
        },
    ]
    for recipe in recipes:
        response = post(served, "/merge", {"recipe": recipe})
        assert 400 <= response.status_code < 500, response.text
        assert "SECRET" not in response.text
    assert snapshot(root) == before


def test_a_good_merge_still_works_and_lands_in_the_folder(world, served):
    _, models, _ = world
    response = post(served, "/merge", merge_body(custom_name="fine name (v2) é", multiplier=0.5))
    assert response.status_code == 200, response.text
    assert Path(response.json()["path"]) == models / "fine name (v2) é.safetensors"
    (models / "fine name (v2) é.safetensors").unlink()


BILLION_LAUGHS = "\n".join(
    ["a: &a [x, x, x, x, x, x, x, x, x]"]
    + [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]" for i in range(8)]
    + ["merge: {method: soup, models: *i}"]
)


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"discard_weights": r"^([a-z_]+\.?)+!"}, ""),  # backtracks without end in `re`, not in `regex`: merges
        ({"discard_weights": r"^(a|aa|[a-z_.]|[a-z_.][a-z_.])+$"}, "discard_weights"),
        ({"recipe": BILLION_LAUGHS}, "recipe"),
        ({"recipe": "merge: &self {method: soup, models: [*self]}"}, "recipe"),
        ({"recipe": "merge: " + "{method: soup, models: [" * 300 + "a.safetensors" + "]}" * 300}, "recipe"),
        ({"recipe": "[" * 100_000 + "]" * 100_000}, "recipe"),
    ],
)
def test_no_single_request_holds_the_server(served, body, named):
    """While the bad request runs, another client lists the models; both answer within seconds."""
    answers = {}

    def bad() -> None:
        started = time.monotonic()
        answers["bad"] = post(served, "/merge", merge_body(**body), timeout=120)
        answers["bad_seconds"] = time.monotonic() - started

    thread = threading.Thread(target=bad)
    thread.start()
    time.sleep(0.2)
    started = time.monotonic()
    listed = httpx.get(served + API + "/models", timeout=60)
    other_seconds = time.monotonic() - started
    thread.join(timeout=120)
    assert listed.status_code == 200 and other_seconds < 5, other_seconds
    response = answers["bad"]
    if named:
        assert 400 <= response.status_code < 500 and named in response.json()["detail"], response.text
    else:
        assert response.status_code == 200, response.text
        Path(response.json()["path"]).unlink()
    assert answers["bad_seconds"] < 10, answers["bad_seconds"]


def header_file(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)
    return path


def test_crafted_files_in_the_folder_get_one_line_answers_and_models_lists_the_rest(tmp_path):
    models = tmp_path / "models"
    make(models / "a.safetensors", seed=1)
    make(models / "b.safetensors", seed=2)
    huge = json.dumps({"w": {"dtype": "F16", "shape": [0, 2**63], "data_offsets": [0, 0]}}).encode()
    header_file(models / "huge.safetensors", huge)
    header_file(models / "deep.safetensors", b'{"w": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    (models / "passwd.safetensors").write_bytes(b"root:x:0:0:root:/root:/bin/bash\n")
    with app(models) as url:
        listed = httpx.get(url + API + "/models", timeout=60)
        assert listed.status_code == 200, listed.text
        entries = {entry["name"]: entry for entry in listed.json()}
        assert entries["a.safetensors"]["architecture"] != "unreadable"
        for bad in ("huge.safetensors", "deep.safetensors", "passwd.safetensors"):
            error = entries[bad]["error"]
            assert bad in error and "\n" not in error and "root:x" not in error, error
            assert "3619251681095544690" not in error  # "root:x:0" read as a header length
        for bad in ("huge.safetensors", "deep.safetensors", "passwd.safetensors"):
            response = post(url, "/merge", merge_body(secondary_model_name=bad))
            assert 400 <= response.status_code < 500, response.text
            detail = response.json()["detail"]
            assert bad in detail and "\n" not in detail and "root:x" not in detail, detail


def upload_event(config: dict, elem_id: str) -> int:
    """The fn_index of the upload event of the component ``elem_id``, in gradio 3's or 4's config."""
    elem_ids = {c["id"]: c.get("props", {}).get("elem_id") for c in config["components"]}
    for index, dependency in enumerate(config["dependencies"]):
        if "trigger" in dependency:  # gradio 3: one trigger for all targets
            targets = [(target, dependency["trigger"]) for target in dependency["targets"]]
        else:  # gradio 4: (id, trigger) pairs
            targets = [tuple(target) for target in dependency["targets"]]
        if any(elem_ids.get(target) == elem_id and trigger == "upload" for target, trigger in targets):
            return dependency.get("id", index)
    raise AssertionError(f"no upload event on {elem_id}")


@pytest.mark.gradio_both
def test_the_tab_reads_no_upload_it_did_not_receive(world, served):
    """A client names a file of the server as its "uploaded" recipe. gradio 3 copies any path a client
    names, and the tab's Load recipe refuses it; gradio 4 refuses it itself (the tab would too)."""
    _, _, outside = world
    secret = outside / "secret-recipe.yaml"
    secret.write_text("merge_lab_recipe: 1\nmerge: {method: soup, models: [SECRET_a.safetensors, b.safetensors]}\n")
    config = httpx.get(served + "/config", timeout=30).json()
    gradio_4 = int(config["version"].split(".")[0]) >= 4
    if gradio_4:
        payload = {"path": str(secret), "meta": {"_type": "gradio.FileData"}}
    else:
        payload = {"name": str(secret), "data": None, "is_file": True}
    response = httpx.post(
        served + "/run/predict",
        json={"fn_index": upload_event(config, "merge_lab_load_recipe"), "data": [payload, "Weighted sum"],
              "session_hash": "attacker"},
        timeout=60,
    )  # fmt: skip
    assert "SECRET" not in response.text
    if gradio_4:
        assert response.status_code == 500 and "is not in the upload folder" in response.json()["error"], response.text
    else:
        assert response.status_code == 200, response.text
        note = response.json()["data"][-2]
        assert note.startswith("Could not load the recipe: recipe: not a file uploaded from this page"), note


@pytest.mark.gradio_both
def test_gradio_serves_no_file_of_the_working_folder(world, served):
    """The app runs in ``root`` (its cwd): gradio 3 would serve any file under it at /file= and /file/."""
    root, models, outside = world
    paths = [str(models / "a.safetensors"), str(outside / "secret.safetensors"), "/etc/hostname"]
    paths += [str((models / "a.safetensors").relative_to(root)), "outside/secret.safetensors"]  # from the cwd
    for path in paths:
        for route in ("/file=", "/file/", "/file%3D"):
            response = httpx.get(f"{served}{route}{path}", timeout=30)
            assert response.status_code in (403, 404), (route, path, response.status_code)
            assert b"SECRET" not in response.content


def basic(user: str, password: str) -> dict:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def test_auth_protects_the_page_and_every_route_and_takes_non_ascii_passwords(world, tmp_path):
    _, models, _ = world
    auth_file = tmp_path / "users.txt"
    auth_file.write_text("# one per line\nalice:pässwörd:with:colons\n\nbob:секрет\n", encoding="utf-8")
    with app(models, "--auth-file", str(auth_file)) as url:
        for method, path in (("GET", "/"), ("GET", "/config"), ("GET", API + "/models"), ("POST", API + "/merge"),
                             ("POST", API + "/cancel"), ("GET", "/file=/etc/hostname")):  # fmt: skip
            for headers in (
                {},
                basic("alice", "wrong"),
                basic("mallory", "pässwörd:with:colons"),
                {"Authorization": "Basic !!"},
                {"Authorization": "Bearer guessed"},
            ):
                response = httpx.request(method, url + path, headers=headers, json={}, timeout=30)
                assert response.status_code == 401, (method, path, headers, response.status_code)
                assert response.headers["www-authenticate"].startswith("Basic")
        for user, password in (("alice", "pässwörd:with:colons"), ("bob", "секрет")):
            assert httpx.get(url + "/", headers=basic(user, password), timeout=30).status_code == 200
            listed = httpx.get(url + API + "/models", headers=basic(user, password), timeout=30)
            assert listed.status_code == 200 and len(listed.json()) >= 2


def test_auth_on_the_command_line(world):
    _, models, _ = world
    with app(models, "--auth", "carol:Zürich 2026") as url:
        assert httpx.get(url + API + "/models", timeout=30).status_code == 401
        assert httpx.get(url + API + "/models", headers=basic("carol", "Zürich 2026"), timeout=30).status_code == 200


@pytest.mark.parametrize("listen", ["0.0.0.0", "::", "192.0.2.10", "example.org"])
def test_listening_beyond_this_machine_without_auth_refuses_to_start(world, listen):
    _, models, _ = world
    done = subprocess.run(
        [sys.executable, "-m", "lib_merge.app", "--models", str(models), "--listen", listen, "--port", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert f"--listen {listen}" in done.stderr and "--auth" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_bad_auth_option_is_refused_naming_it(world, tmp_path):
    _, models, _ = world
    (tmp_path / "empty.txt").write_text("# nobody\n")
    for args in (["--auth", "nopassword"], ["--auth-file", str(tmp_path / "missing.txt")],
                 ["--auth-file", str(tmp_path / "empty.txt")]):  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-m", "lib_merge.app", "--models", str(models), *args],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 2 and args[0] in done.stderr and "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def big_models(tmp_path_factory):
    """Two SD1.5-layout checkpoints of ~150 MB: a merge of them takes long enough to be cancelled."""
    from lib_merge.synthetic import layout, scaled

    models = tmp_path_factory.mktemp("big") / "models"
    specs = scaled(layout("sd15"), max_dim=256)
    make(models / "a.safetensors", specs=specs, seed=1)
    make(models / "b.safetensors", specs=specs, seed=2)
    return models


def test_cancel_stops_only_the_job_it_names(big_models):
    with app(big_models) as url:
        answers = {}

        def merge(name: str) -> None:
            answers[name] = post(url, "/merge", merge_body(custom_name=name, id_task=name, device="cpu"), timeout=300)

        thread = threading.Thread(target=merge, args=("mine",))
        thread.start()
        deadline = time.monotonic() + 120
        while not list(big_models.glob(".mine.safetensors.*.merge-lab.tmp")) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert post(url, "/cancel", {"id_task": "someone-else"}).json() == {"cancelled": False}
        assert post(url, "/cancel", {"id_task": ""}).json() == {"cancelled": False}
        assert post(url, "/cancel", {"id_task": "mine"}).json() == {"cancelled": True}
        thread.join(timeout=300)
        assert answers["mine"].status_code == 409 and "cancel" in answers["mine"].json()["detail"].lower()
        assert sorted(p.name for p in big_models.iterdir()) == ["a.safetensors", "b.safetensors"]

        done = post(url, "/merge", merge_body(custom_name="whole", id_task="next"), timeout=300)
        assert done.status_code == 200 and done.json()["id_task"] == "next"
        made = post(url, "/merge", merge_body(custom_name="anonymous"), timeout=300).json()
        assert made["id_task"].startswith("merge-lab-") and len(made["id_task"]) > 30  # unguessable


def test_a_killed_merges_temp_file_is_removed_at_the_next_start(big_models, tmp_path):
    """A CLI merge killed with SIGKILL leaves its full-size temp file; the app's start removes it."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    output = big_models / "killed.safetensors"
    merge = subprocess.Popen(
        [sys.executable, "-m", "lib_merge", "merge", str(big_models / "a.safetensors"),
         str(big_models / "b.safetensors"), "-o", str(output)],
        cwd=ROOT, env=env,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (leftovers := list(big_models.glob(".killed.safetensors.*.merge-lab.tmp"))):
        assert time.monotonic() < deadline and merge.poll() is None, "the merge ended before it could be killed"
        time.sleep(0.01)
    merge.kill()
    merge.wait()
    assert all(path.exists() for path in leftovers)
    with app(big_models):
        assert not any(path.exists() for path in leftovers)
        assert not output.exists()
