"""No request holds the server (DESIGN 3b): discard_weights, recipes, metadata, numbers and devices
are bounded or refused by name before any work, on real files where files are involved."""

from __future__ import annotations

import json
import re
import runpy
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from test_cli import cli

import lib_merge
from lib_merge import FolderHost, MergeRequest, RequestError, merge
from lib_merge.actions import request_from_fields
from lib_merge.arch import SD1
from lib_merge.blocks import finite_number, parse_blocks
from lib_merge.io.metadata import user_metadata
from lib_merge.methods import get_method
from lib_merge.recipe import (
    MAX_RECIPE_BYTES,
    MAX_RECIPE_DEPTH,
    MAX_RECIPE_NODES,
    MAX_TREE_DEPTH,
    MergeNode,
    ModelRef,
    dump_recipe,
    load_recipe,
    node_from_dict,
    parse_recipe,
    request_from_recipe,
)
from lib_merge.request import MAX_METADATA_JSON

# Exponential backtracking on every SD key name (letters, digits, "_" and "."), which end in a letter.
CATASTROPHIC = r"^([a-z_.]|[a-z_.]{2})*[0-9]$"
HUGE = 10**400  # JSON's 1 followed by 400 zeros: a Python int no float can hold


@pytest.fixture(autouse=True)
def private_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def soup_recipe(depth: int = 1) -> dict:
    """A soup of A and B, wrapped in ``depth - 1`` further soups with C."""
    node: dict = {"method": "soup", "models": ["a.safetensors", "b.safetensors"]}
    for _ in range(depth - 1):
        node = {"method": "soup", "models": [node, "c.safetensors"]}
    return {"merge_lab_recipe": 1, "merge": node, "output": {"custom_name": "souped"}}


def timed(call):
    started = time.perf_counter()
    with pytest.raises(RequestError) as caught:
        call()
    return str(caught.value), time.perf_counter() - started


# discard_weights ---------------------------------------------------------------------------------


def test_a_catastrophic_discard_pattern_is_refused_in_about_a_second_and_never_freezes_other_threads(host, models):
    before = sorted(models.iterdir())
    gaps, stop = [], threading.Event()

    def ticker():  # needs the GIL: a search that held it would leave a gap of the whole second
        last = time.perf_counter()
        while not stop.is_set():
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
            time.sleep(0.001)

    thread = threading.Thread(target=ticker)
    thread.start()
    try:
        message, seconds = timed(
            lambda: merge(MergeRequest("a.safetensors", "b.safetensors", discard_weights=CATASTROPHIC), host)
        )
    finally:
        stop.set()
        thread.join()
    assert re.fullmatch(
        r"discard_weights: the pattern took too long on key [a-z_.0-9]+ \(over 1 s\); simplify it", message
    )
    assert 0.9 < seconds < 2.5
    assert max(gaps) < 0.5, f"another thread waited {max(gaps):.2f} s"
    assert sorted(models.iterdir()) == before  # the merge never ran


def test_a_normal_discard_pattern_still_drops_the_keys_it_names(host):
    result = merge(
        MergeRequest("a.safetensors", "b.safetensors", discard_weights=r"^first_stage_model\.|model_ema"), host
    )
    with lib_merge.open_checkpoint(result.path) as reader:
        keys = reader.keys()
    assert keys and not any(key.startswith("first_stage_model.") for key in keys)
    assert any(key.startswith("model.diffusion_model.") for key in keys)


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("(", "discard_weights: invalid regular expression '('"),
        ("(" * 3000, "discard_weights: the pattern is over 2,000 characters"),
        # the regex module unrolls counted repeats: this one would cost a second and 600 MB to compile
        ("(?:a{1000}){1000}", "discard_weights: counted repeats {n} multiply to over 10,000"),
        ("a{99999999999999999999}", "discard_weights: counted repeats"),
    ],
)
def test_bad_discard_patterns_are_refused_at_once_by_field_name(host, pattern, message):
    def refused(pattern: str):
        return timed(lambda: merge(MergeRequest("a.safetensors", "b.safetensors", discard_weights=pattern), host))

    # The preflight that reads both headers comes first; the best of a few runs, as others may load the machine.
    preflight = min(refused("(")[1] for _ in range(3))
    text, seconds = min((refused(pattern) for _ in range(2)), key=lambda outcome: outcome[1])
    assert text.startswith(message) and seconds < preflight + 0.4


# recipes -----------------------------------------------------------------------------------------

BILLION_LAUGHS = "\n".join(
    [
        'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]',
        *(f"{n}: &{n} [{','.join(['*' + p] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi", strict=True)),
        "merge: {method: soup, models: [*i, b.safetensors]}",
    ]
)


def test_a_billion_laughs_yaml_is_refused_before_anything_is_built():
    assert len(BILLION_LAUGHS) < 800  # ~9**9 strings, gigabytes, once expanded
    message, seconds = timed(lambda: parse_recipe(BILLION_LAUGHS))
    assert message.startswith("recipe: YAML anchors and aliases") and seconds < 0.2


@pytest.mark.parametrize(
    "text",
    [
        "merge: &m {method: soup, models: [*m, a.safetensors]}",  # a recipe inside itself
        "merge: &m [a.safetensors]\noutput: {custom_name: x}",  # an anchor alone is refused too
    ],
)
def test_recursive_and_anchored_yaml_is_refused(text):
    assert timed(lambda: parse_recipe(text))[0].startswith("recipe: YAML anchors and aliases")


def test_a_recipe_file_too_large_deep_or_wide_is_refused_before_any_model_is_opened(tmp_path, host):
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * MAX_RECIPE_BYTES + "\n")
    assert timed(lambda: load_recipe(big))[0] == f"{big}: the recipe is over {MAX_RECIPE_BYTES:,} bytes"
    deep = tmp_path / "deep.yaml"
    deep.write_text("merge: " + "[" * 300 + "]" * 300 + "\n")
    assert "nested deeper than 64 levels" in timed(lambda: load_recipe(deep))[0]
    wide = tmp_path / "wide.yaml"
    wide.write_text("merge:\n" + "".join(f"  - m{i}\n" for i in range(MAX_RECIPE_NODES)))
    message, seconds = timed(lambda: load_recipe(wide))
    assert message == f"{wide}: more than {MAX_RECIPE_NODES:,} values" and seconds < 3


def test_without_libyaml_yaml_is_kept_short_and_still_checked(monkeypatch):
    yaml = pytest.importorskip("yaml")
    monkeypatch.delattr(yaml, "CSafeLoader", raising=False)  # PyYAML built without libyaml
    long_yaml = "merge: [" + ",".join(["0"] * 15_000) + "]"
    message, seconds = timed(lambda: parse_recipe(long_yaml))
    assert message == "recipe: YAML over 20,000 characters needs PyYAML with libyaml; send JSON" and seconds < 0.1
    assert timed(lambda: parse_recipe(BILLION_LAUGHS))[0].startswith("recipe: YAML anchors and aliases")
    assert parse_recipe("merge: {method: soup, models: [a, b]}") == {"merge": {"method": "soup", "models": ["a", "b"]}}
    assert len(parse_recipe(json.dumps({"merge": list(range(15_000))}))["merge"]) == 15_000  # JSON needs no YAML


def test_json_nested_100000_deep_is_a_request_error_not_a_recursion_error():
    message, seconds = timed(lambda: parse_recipe("[" * 100_000 + "]" * 100_000))
    assert message == f"recipe: nested deeper than {MAX_RECIPE_DEPTH} levels" and seconds < 1
    assert timed(lambda: parse_recipe('{"merge": ' * 100 + "1" + "}" * 100))[0].endswith("64 levels")


def test_a_merge_tree_nested_300_deep_is_refused_in_every_form(host, models):
    deep = soup_recipe(300)
    for call in (
        lambda: parse_recipe(json.dumps(deep)),
        lambda: request_from_recipe(deep),
        lambda: request_from_fields({"recipe": json.dumps(deep)}),  # the API's text form
        lambda: request_from_fields({"recipe": deep}),  # the API's parsed form
    ):
        assert "nested deeper than" in timed(call)[0]
    # within the document's limits but past the tree's: named as the tree's
    message = timed(lambda: request_from_recipe(soup_recipe(MAX_TREE_DEPTH + 1)))[0]
    assert message.endswith(f"the merge tree is nested deeper than {MAX_TREE_DEPTH} levels of methods")
    node = MergeNode("soup", (ModelRef("a.safetensors"), ModelRef("b.safetensors")))
    for _ in range(MAX_TREE_DEPTH):
        node = MergeNode("soup", (node, ModelRef("c.safetensors")))
    assert timed(lambda: MergeRequest("a.safetensors", tree=node))[0].startswith("tree: the merge tree is nested")
    # the deepest allowed tree still merges
    result = merge(request_from_recipe(soup_recipe(MAX_TREE_DEPTH)), host)
    assert result.path == models / "souped.safetensors"


def test_a_dict_that_contains_itself_is_refused():
    recipe = soup_recipe()
    recipe["merge"]["models"].append(recipe["merge"])
    for call in (lambda: request_from_recipe(recipe), lambda: request_from_fields({"recipe": recipe})):
        assert timed(call)[0] == "recipe: refers to itself (a mapping or list contains itself)"
    assert "refers to itself" in timed(lambda: node_from_dict(recipe["merge"]))[0]
    walk: dict = {"steps": []}
    walk["steps"].append(walk)
    assert "refers to itself" in timed(lambda: MergeRequest("a.safetensors", provenance={"greedy_soup": walk}))[0]


def test_a_shared_value_is_not_refused_but_counted_each_time_it_appears():
    shared = ["lol"] * 9
    for _ in range(8):  # 9**8 values if walked naively: refused by the count, at once
        shared = [shared] * 9
    message, seconds = timed(lambda: request_from_recipe({**soup_recipe(), "greedy_soup": {"x": shared}}))
    assert message == f"recipe: more than {MAX_RECIPE_NODES:,} values" and seconds < 1


def test_yaml_errors_give_line_and_column_never_the_text():
    text = "merge:\n  method: soup\n  secret: hunter2: again\n"
    message = timed(lambda: parse_recipe(text))[0]
    assert message.startswith("recipe: not valid YAML or JSON (line 3, column ")
    assert "hunter2" not in message and "again" not in message
    tagged = timed(lambda: parse_recipe("merge: !!python/object/apply:os.system [hunter2]"))[0]
    assert "hunter2" not in tagged and "os.system" not in tagged


def test_huge_integers_in_recipe_text_are_request_errors():
    assert timed(lambda: parse_recipe('{"merge": ' + "1" * 5000 + "}"))[0] == "recipe: a number has too many digits"
    assert "too many digits" in timed(lambda: parse_recipe("merge: " + "1" * 5000))[0]


def test_dump_recipe_writes_a_value_used_twice_out_twice_so_it_reads_back():
    params = {"weights": [1, 2]}
    recipe = {"merge": {"method": "soup", "models": ["a.safetensors", "b.safetensors"], "params": params}}
    recipe["greedy_soup"] = {"same": params}  # the same dict twice: safe_dump would anchor it
    text = dump_recipe(recipe)
    assert "&" not in text and "*" not in text
    assert parse_recipe(text) == recipe


# numbers -----------------------------------------------------------------------------------------


def test_numbers_outside_float_range_are_refused_by_field_name():
    for call, field in (
        (lambda: MergeRequest("a.safetensors", "b.safetensors", multiplier=HUGE), "multiplier: "),
        (lambda: request_from_fields({"primary_model_name": "a.safetensors", "multiplier": HUGE}), "multiplier: "),
        (lambda: get_method("ties").check_params({"lambda": HUGE}), "params.lambda: "),
        (lambda: get_method("soup").check_params({"weights": [1, HUGE]}), "params.weights[1]: "),
        (lambda: get_method("dare").check_params({"seed": HUGE}), "params.seed: "),
        (lambda: finite_number(HUGE, "blocks.alpha"), "blocks.alpha: "),
        (lambda: parse_blocks("IN00=1", SD1, param="alpha", default=HUGE), "blocks.alpha: "),
    ):
        message = timed(call)[0]
        assert message.startswith(field) and "outside the range of a float" in message, message
        assert "0" * 100 not in message  # not echoed whole
    recipe = json.loads(
        '{"merge": {"method": "weighted_sum", "models": ["a", "b"], "params": {"alpha": 1%s}}}' % ("0" * 400)
    )
    assert timed(lambda: request_from_recipe(recipe))[0].startswith("merge.params.alpha: ")
    assert "not a finite number" in timed(lambda: parse_blocks("IN00=1" + "0" * 400, SD1, param="a", default=0))[0]


# devices -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["meta", "cuda:x", "vulkan", "CPU", "cuda:", "cuda:1:2", "mps:0", None, 0])
def test_only_known_devices_may_be_asked_for(device):
    message = timed(lambda: MergeRequest("a.safetensors", "b.safetensors", device=device))[0]
    assert message.startswith("device: unknown device ")


@pytest.mark.parametrize("device", ["auto", "", "cpu", "cuda", "cuda:0", "cuda:12", "mps"])
def test_known_devices_are_accepted_when_asked_for(device):
    assert MergeRequest("a.safetensors", "b.safetensors", device=device).device == device


def test_a_gpu_this_machine_lacks_is_a_request_error_naming_it(host, models, monkeypatch):
    before = sorted(models.iterdir())
    if not torch.cuda.is_available():
        message = timed(lambda: merge(MergeRequest("a.safetensors", "b.safetensors", device="cuda"), host))[0]
        assert message == "device: cuda was asked for, but this machine has no usable CUDA GPU"
        cuda_host = FolderHost(models, device="cuda")  # the host's choice is checked too
        assert timed(lambda: merge(MergeRequest("a.safetensors", "b.safetensors"), cuda_host))[0].startswith(
            "device: cuda was asked for"
        )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    message = timed(lambda: merge(MergeRequest("a.safetensors", "b.safetensors", device="cuda:3"), host))[0]
    assert message == "device: cuda:3 was asked for, but this machine has 1 CUDA GPU(s): cuda:0-0"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    message = timed(lambda: merge(MergeRequest("a.safetensors", "b.safetensors", device="mps"), host))[0]
    assert message == "device: mps was asked for, but MPS is not available here"
    assert sorted(models.iterdir()) == before


# metadata_json -----------------------------------------------------------------------------------


def test_metadata_json_over_the_cap_is_refused():
    too_long = json.dumps({"note": "x" * MAX_METADATA_JSON})
    expected = f"metadata_json: over {MAX_METADATA_JSON:,} characters; keep the metadata short"
    assert timed(lambda: MergeRequest("a.safetensors", "b.safetensors", metadata_json=too_long))[0] == expected
    assert timed(lambda: user_metadata(too_long))[0] == expected
    assert timed(lambda: user_metadata("[" * 100_000))[0] == "metadata_json: nested too deeply"
    assert (
        timed(lambda: user_metadata('{"n": 1' + "0" * 5000 + "}"))[0] == "metadata_json: a number has too many digits"
    )


def header_of(path: Path) -> bytes:
    with open(path, "rb") as file:
        size = int.from_bytes(file.read(8), "little")
        return file.read(size)


def test_metadata_json_is_stored_once_and_replay_still_rebuilds_the_same_file(host, models, tmp_path):
    marker = "MARKER-" + "m" * 10_000
    fields = {"format": "mine", "note": marker, "n": 3, "tags": ["a", "b"]}
    result = merge(
        MergeRequest("a.safetensors", "b.safetensors", custom_name="tagged", metadata_json=json.dumps(fields)), host
    )
    header = header_of(result.path)
    assert header.count(b"MARKER-") == 1
    metadata = json.loads(header)["__metadata__"]
    assert metadata["note"] == marker and metadata["n"] == "3" and metadata["format"] == "pt"
    recipe = json.loads(metadata["sd_merge_recipe"])
    assert recipe["metadata_fields"] == ["format", "note", "n", "tags"]
    assert "metadata_json" not in recipe["merge_lab_recipe"]["output"]
    replayed = cli("replay", result.path, "-o", tmp_path / "replayed.safetensors")
    assert replayed.returncode == 0, replayed.stderr
    assert (tmp_path / "replayed.safetensors").read_bytes() == result.path.read_bytes()


# install.py --------------------------------------------------------------------------------------


def test_install_adds_regex_only_where_it_is_missing(monkeypatch):
    calls = []
    launch = type(sys)("launch")
    launch.run_pip = lambda command, desc=None: calls.append(command)
    monkeypatch.setitem(sys.modules, "launch", launch)
    hook = runpy.run_path(str(Path(__file__).resolve().parents[1] / "install.py"))
    versions = {"safetensors": (0, 4, 2), "regex": None}
    monkeypatch.setitem(hook["main"].__globals__, "installed_version", versions.get)
    hook["main"]()
    assert calls == ['install "regex>=2019.3.12"']
    versions["regex"] = (2023, 10, 3)  # what a webui has through transformers
    hook["main"]()
    assert len(calls) == 1
