"""Names from the tab, the API and recipes resolve inside the host's folders only (lib_merge.names,
FolderHost), on real files; the CLI keeps taking paths."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from cli_runner import run_cli
from conftest import make

from lib_merge import FolderHost, MergeRequest, actions, merge
from lib_merge.auth import check_basic_auth, parse_pair, read_auth_file
from lib_merge.errors import InputError, MergeError, RequestError
from lib_merge.loop.runner import ImageSettings
from lib_merge.names import NAME_MAX_BYTES, TEMP_NAME_OVERHEAD, inside, output_file_name, relative_name, shorten

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("/etc/passwd", "absolute paths are not accepted"),
        ("\\\\server\\share\\x", "absolute paths are not accepted"),
        ("C:\\models\\x.safetensors", "absolute paths are not accepted"),
        ("~/x.safetensors", "absolute paths are not accepted"),
        ("../x.safetensors", "'..' is not accepted"),
        ("sub/../../x.safetensors", "'..' is not accepted"),
        ("sub\\..\\..\\x.safetensors", "'..' is not accepted"),
        ("a\x00b", "NUL"),
        ("a\nb", "control characters"),
        ("", "empty name"),
        ("./.", "names no file"),
        ("x" * 256, "at most 255 bytes"),
    ],
)
def test_a_name_that_could_leave_its_folder_is_refused_naming_the_field(name, message):
    with pytest.raises(RequestError) as caught:
        relative_name(name, "field")
    assert str(caught.value).startswith("field: ") and message in str(caught.value)


def test_a_relative_name_joins_inside_its_folder(tmp_path):
    assert inside(tmp_path, "sub/./x.safetensors", "f") == tmp_path / "sub" / "x.safetensors"
    assert inside(tmp_path, "sub\\x.safetensors", "f") == tmp_path / "sub" / "x.safetensors"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("sub/x.safetensors", "without folders"),
        ("..safetensors", "cannot start with '.'"),
        (".hidden.safetensors", "cannot start with '.'"),
        ("x" * (NAME_MAX_BYTES - TEMP_NAME_OVERHEAD + 1), "bytes"),
    ],
)
def test_an_output_name_is_one_file_whose_temp_name_fits_too(name, message):
    with pytest.raises(RequestError, match=message):
        output_file_name(name, "custom_name")
    assert output_file_name("x" * (NAME_MAX_BYTES - TEMP_NAME_OVERHEAD), "custom_name")


def test_shorten_cuts_on_a_character_boundary_within_the_byte_limit():
    cut = shorten("é" * 200, 101)
    assert cut.endswith("...") and len(cut.encode()) <= 101 and "\ufffd" not in cut


def test_the_folder_host_resolves_inside_its_folder_and_a_users_symlink_still_works(models, tmp_path):
    outside = make(tmp_path / "outside" / "secret.safetensors", seed=9)
    host = FolderHost(models, hash_cache=tmp_path / "h.json")
    for name in (str(outside), "../outside/secret.safetensors"):
        with pytest.raises(RequestError):
            host.resolve(name)
    (models / "notes.txt").write_text("not a model")
    with pytest.raises(InputError, match="not a checkpoint name"):
        host.resolve("notes.txt")
    (models / "linked.safetensors").symlink_to(outside)  # placed by the user: their choice
    assert host.resolve("linked.safetensors").path == models / "linked.safetensors"
    assert host.resolve("a.safetensors [0123456789]").name == "a.safetensors"


def test_the_cli_host_still_takes_paths(models, tmp_path):
    outside = make(tmp_path / "outside" / "x.safetensors", seed=9)
    host = FolderHost(models, hash_cache=tmp_path / "h.json", allow_paths=True)
    assert host.resolve(str(outside)).path == outside


def test_the_cli_merges_files_named_by_path_anywhere(tmp_path, monkeypatch):
    a, b = make(tmp_path / "one" / "a.safetensors", seed=1), make(tmp_path / "two" / "b.safetensors", seed=2)
    output = tmp_path / "three" / "m.safetensors"
    output.parent.mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "c"))
    done = run_cli("merge", a, b, "-o", output, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert output.is_file()


def test_a_vae_resolves_in_the_vae_folder_only(models, tmp_path):
    vaes = tmp_path / "vae"
    make(vaes / "good.safetensors", seed=4)
    make(tmp_path / "elsewhere.safetensors", seed=5)
    host = FolderHost(models, vae_dir=vaes, hash_cache=tmp_path / "h.json")
    assert host.vae_path("good.safetensors") == vaes / "good.safetensors"
    assert host.vae_path("missing.safetensors") is None
    for name in (str(tmp_path / "elsewhere.safetensors"), "../elsewhere.safetensors"):
        with pytest.raises(RequestError, match="bake_in_vae"):
            host.vae_path(name)


def test_the_tabs_preflight_refuses_a_custom_name_with_a_folder(host):
    ok, report = actions.preflight_report(host, MergeRequest("a.safetensors", "b.safetensors", custom_name="../x"))
    assert not ok and report.startswith("Refused: custom_name: ") and "Ready" not in report


@pytest.mark.parametrize("custom_name", ["../escape", "/abs", "a/b", ".."])
def test_a_custom_name_with_a_folder_is_refused_and_nothing_is_written(host, models, tmp_path, custom_name):
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(RequestError, match="custom_name"):
        merge(MergeRequest("a.safetensors", "b.safetensors", custom_name=custom_name), host)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no output, no hash cache written


def test_a_generated_name_from_long_model_names_is_cut_to_fit(tmp_path):
    models = tmp_path / "models"
    long_a, long_b = "a" * 150 + ".safetensors", "é" * 100 + ".safetensors"
    make(models / long_a, seed=1)
    make(models / long_b, seed=2)
    result = merge(MergeRequest(long_a, long_b), FolderHost(models, hash_cache=tmp_path / "h.json", device="cpu"))
    assert result.path.is_file() and len(result.path.name.encode()) <= NAME_MAX_BYTES - TEMP_NAME_OVERHEAD


def test_read_metadata_reads_only_checkpoints_in_the_folder(models, tmp_path):
    make(tmp_path / "secret.safetensors", seed=3, metadata={"secret": "SECRET"})
    host = FolderHost(models, hash_cache=tmp_path / "h.json")
    for name in (str(tmp_path / "secret.safetensors"), "../secret.safetensors"):
        with pytest.raises(MergeError) as caught:
            actions.read_metadata(host, ["a.safetensors", name])
        assert "SECRET" not in str(caught.value)


def test_an_upload_must_come_from_gradios_upload_folder(tmp_path):
    pytest.importorskip("gradio")
    from lib_merge.ui.method_controls import uploaded_path

    uploads = tmp_path / "gradio"
    (uploads / "abc").mkdir(parents=True)
    good = uploads / "abc" / "recipe.yaml"
    good.write_text("merge: {method: soup, models: [a.safetensors, b.safetensors]}\n")
    secret = tmp_path / "secret.yaml"
    secret.write_text("SECRET")
    assert uploaded_path(SimpleNamespace(name=str(good), orig_name=str(good)), [uploads]) == good
    copied = uploads / "abc" / "copy.yaml"  # gradio's copy of a path the client named
    copied.write_text("SECRET")
    for upload in (
        SimpleNamespace(name=str(copied), orig_name=str(secret)),
        SimpleNamespace(name=str(secret), orig_name=str(good)),
        str(secret),
        SimpleNamespace(name=str(uploads / "abc" / ".." / ".." / "secret.yaml"), orig_name=None),
    ):
        with pytest.raises(RequestError, match="not a file uploaded from this page"):
            uploaded_path(upload, [uploads])


def test_the_tab_loads_an_uploaded_recipe_and_refuses_a_huge_one(tmp_path):
    pytest.importorskip("gradio")
    from lib_merge.ui.method_controls import load_recipe

    fields = ("interp_method", "primary_model_name")
    (tmp_path / "good.yaml").write_text("merge: {method: soup, models: [a.safetensors, b.safetensors]}\n")
    *updates, note, _ = load_recipe(str(tmp_path / "good.yaml"), fields, "Weighted sum", [tmp_path])
    assert note == "Recipe loaded." and updates[1]["value"] == "a.safetensors"
    (tmp_path / "big.yaml").write_bytes(b"#" * 1_000_001)
    *_, note, _ = load_recipe(str(tmp_path / "big.yaml"), fields, "Weighted sum", [tmp_path])
    assert note.startswith("Could not load the recipe: ") and "over 1,000,000 bytes" in note


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_basic_auth_compares_utf8_credentials_of_every_user():
    users = {"alice": "pässwörd", "bob": "b:o:b"}
    assert check_basic_auth(basic("alice", "pässwörd"), users)
    assert check_basic_auth(basic("bob", "b:o:b"), users)
    for header in (None, "", basic("alice", "passwort"), basic("bob", "pässwörd"), basic("eve", "b:o:b"),
                   "Bearer x", "Basic ???", "Basic " + base64.b64encode(b"alice").decode()):  # fmt: skip
        assert not check_basic_auth(header, users), header


def test_auth_options_parse_and_name_what_is_wrong(tmp_path):
    assert parse_pair("u:p:q", "--auth") == ("u", "p:q")
    for bad in ("u", ":p", "u:"):
        with pytest.raises(ValueError, match="--auth"):
            parse_pair(bad, "--auth")
    users = tmp_path / "users"
    users.write_text("# comment\n\n  a:1  \nb:2\n")
    assert read_auth_file(users) == {"a": "1", "b": "2"}
    users.write_text("a:1\nbroken\n")
    with pytest.raises(ValueError, match="line 2"):
        read_auth_file(users)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("steps", 100_000),
        ("width", 16384),
        ("height", 0),
        ("seed", 2**40),
        ("steps", 2.5),
        ("cfg_scale", 1e400),
        ("cfg_scale", "x"),
        ("cfg_scale", float("nan")),
        ("prompt", 3),
    ],
)
def test_image_settings_from_a_request_stay_within_txt2imgs_ranges(field, value):
    with pytest.raises(RequestError, match=f"sweep.{field}"):
        ImageSettings(**{field: value})
    assert ImageSettings(steps=150, width=2048, height=2048, cfg_scale="7.5").cfg_scale == 7.5


def test_the_cli_answers_a_crafted_header_in_one_line(tmp_path):
    """A zero-size tensor with a dimension of 2**63 used to reach torch and print a C++ stack trace."""
    a = make(tmp_path / "a.safetensors", seed=1)
    header = b'{"w": {"dtype": "F16", "shape": [0, 9223372036854775808], "data_offsets": [0, 0]}}'
    crafted = tmp_path / "crafted.safetensors"
    crafted.write_bytes(len(header).to_bytes(8, "little") + header)
    done = subprocess.run(
        [sys.executable, "-m", "lib_merge", "merge", str(a), str(crafted), "-o", str(tmp_path / "out.safetensors")],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "c")},
    )  # fmt: skip
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert "crafted.safetensors" in line and "shape" in line and "Traceback" not in line
    assert not (tmp_path / "out.safetensors").exists()
