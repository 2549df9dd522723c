"""The command line end to end on real files: in this process (``run_cli``), and as ``python -m
lib_merge`` in a child process where the process itself is tested (``spawn_cli``)."""

import hashlib
import json
import re

import pytest
import torch
from cli_runner import run_cli, spawn_cli
from conftest import SDXL, make

cli = run_cli


@pytest.fixture(autouse=True)
def private_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_merge_prints_the_output_and_its_sha256(models, tmp_path):
    out = tmp_path / "merged.safetensors"
    done = spawn_cli("merge", models / "a.safetensors", models / "b.safetensors", "--alpha", "0.5", "-o", out, "--half")
    assert done.returncode == 0, done.stderr
    path, sha_line = done.stdout.strip().splitlines()
    assert path == str(out)
    assert sha_line == f"sha256 {hashlib.sha256(out.read_bytes()).hexdigest()}"


def test_add_difference_to_ckpt_and_inspect(models, tmp_path):
    out = tmp_path / "diff.ckpt"
    args = ("merge", models / "a.safetensors", models / "b.safetensors", models / "c.safetensors")
    done = cli(*args, "--method", "add-difference", "--alpha", "1", "-o", out)
    assert done.returncode == 0, done.stderr
    inspected = cli("inspect", out)
    assert "Architecture: SD1" in inspected.stdout and "float16" in inspected.stdout


def test_inspect_reports_architecture_params_and_recipe(models, tmp_path):
    out = tmp_path / "m.safetensors"
    assert cli("merge", models / "a.safetensors", models / "b.safetensors", "-o", out).returncode == 0
    report = json.loads(cli("inspect", out, "--json").stdout)
    assert report["architecture"] == "SD1"
    assert report["keys"] == 1143
    assert report["sd_merge_recipe"]["type"] == "merge-lab"
    assert report["sd_merge_recipe"]["multiplier"] == 0.3
    text = cli("inspect", out).stdout
    assert "Merge recipe (sd_merge_recipe):" in text and '"interp_method": "Weighted sum"' in text


def test_dry_run_prints_the_preflight_and_writes_nothing(models, tmp_path):
    out = tmp_path / "dry.safetensors"
    done = cli("merge", models / "a.safetensors", models / "b.safetensors", "-o", out, "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "A: a.safetensors: SD1, 1143 keys" in done.stdout or "A: " in done.stdout
    assert "Free space in" in done.stdout and "Ready to merge." in done.stdout
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "add-difference"], "requires a tertiary model"),
        (["--discard", "("], "discard_weights: invalid regular expression"),
        (["--vae", "nope.safetensors"], "bake_in_vae: no VAE named 'nope.safetensors'"),
        (["--device", "tpu9"], "device: unknown device 'tpu9'"),
    ],
)
def test_bad_options_exit_non_zero_with_a_short_message(models, tmp_path, extra, message):
    done = cli("merge", models / "a.safetensors", models / "b.safetensors", "-o", tmp_path / "x.safetensors", *extra)
    assert done.returncode == 1
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_incompatible_models_are_refused_naming_the_key(models, tmp_path):
    make(models / "xl.safetensors", specs=SDXL, seed=4)
    done = cli("merge", models / "a.safetensors", models / "xl.safetensors", "-o", tmp_path / "x.safetensors")
    assert done.returncode == 1
    assert re.search(r"A is SD1 \([^)]*a\.safetensors\), B is SDXL \([^)]*xl\.safetensors\)", done.stderr)
    assert "key model.diffusion_model." in done.stderr
    dry = cli(
        "merge", models / "a.safetensors", models / "xl.safetensors", "-o", tmp_path / "x.safetensors", "--dry-run"
    )
    assert dry.returncode == 1 and "Refused: nothing will be written." in dry.stdout


def test_existing_output_and_inputs_are_protected(models, tmp_path):
    out = tmp_path / "o.safetensors"
    assert cli("merge", models / "a.safetensors", models / "b.safetensors", "-o", out).returncode == 0
    again = cli("merge", models / "a.safetensors", models / "b.safetensors", "-o", out)
    assert again.returncode == 1 and "already exists" in again.stderr
    assert cli("merge", models / "a.safetensors", models / "b.safetensors", "-o", out, "--overwrite").returncode == 0
    a_before = (models / "a.safetensors").read_bytes()
    onto_input = cli(
        "merge", models / "a.safetensors", models / "b.safetensors", "-o", models / "a.safetensors", "--overwrite"
    )
    assert onto_input.returncode == 1 and "is one of the inputs" in onto_input.stderr
    assert (models / "a.safetensors").read_bytes() == a_before


def test_missing_input_names_the_file(tmp_path):
    done = spawn_cli(
        "merge", tmp_path / "nope.safetensors", tmp_path / "nope2.safetensors", "-o", tmp_path / "x.safetensors"
    )
    assert done.returncode == 1 and "nope.safetensors: no such checkpoint" in done.stderr


def test_demo_makes_and_merges_two_checkpoints(tmp_path):
    done = cli("demo", "--dir", tmp_path / "demo")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "demo" / "demo_merged.safetensors").exists()
    assert "Architecture: SD1" in done.stdout


def test_bench_runs_and_prints_ratios(tmp_path):
    # The builtin cases and one recipe tree (TIES's tree is timed the same way, at twice the cost);
    # a cold cache has no warm-up round: each contender's interpreter (a torch import) starts once.
    done = cli("bench", "--max-dim", "64", "--repeats", "1", "--scenarios", "builtin,soup", "--work", tmp_path / "bench",
               "--no-fsync", "--cache", "cold")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert re.search(r"^soup +[0-9.]+ +[0-9.]+ +[0-9.]+ ", done.stdout, re.M), done.stdout
    rows = {
        line.split()[0]: line.split()
        for line in done.stdout.splitlines()
        if line.split() and line.split()[0] in ("floor", "engine", "baseline")
    }
    assert set(rows) == {"floor", "engine", "baseline"}
    assert float(rows["floor"][2]) == 1.0 and float(rows["engine"][1]) > 0


def test_cuda_without_a_gpu_is_a_clear_error(models, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    done = cli(
        "merge",
        models / "a.safetensors",
        models / "b.safetensors",
        "-o",
        tmp_path / "x.safetensors",
        "--device",
        "cuda",
    )
    assert done.returncode == 1 and "device: cuda was asked for" in done.stderr
    assert list(tmp_path.glob("*x.safetensors*")) == []


def test_terminal_progress_bar_draws_and_ends_its_line():
    import io

    from lib_merge.cli.main import TerminalProgress
    from lib_merge.engine import Progress

    stream = io.StringIO()
    bar = TerminalProgress(stream, width=10)
    bar(Progress(1, 2, 500, 1000, "k"))
    bar(Progress(2, 2, 1000, 1000, "k", note="moved to the CPU"))
    bar.close()
    text = stream.getvalue()
    assert "\r[#####.....] 1/2 keys" in text and "[##########] 2/2 keys" in text
    assert "note: moved to the CPU" in text and text.endswith("\n")


@pytest.mark.parametrize("spelling", ["task_arithmetic", "task-arithmetic", "Task arithmetic"])
def test_a_method_is_taken_as_recipes_the_cli_and_the_tab_spell_it(models, tmp_path, spelling):
    """A method name copied from a recipe (task_arithmetic) works on the command line too."""
    out = tmp_path / "ta.safetensors"
    done = cli("merge", models / "a.safetensors", models / "b.safetensors", "--method", spelling, "-o", out)
    assert done.returncode == 0, done.stderr
    assert (
        json.loads(cli("inspect", out, "--json").stdout)["sd_merge_recipe"]["merge_lab_recipe"]["merge"]["method"]
        == "task_arithmetic"
    )


def test_an_unknown_method_is_refused_listing_the_known_ones(models, tmp_path):
    done = spawn_cli(
        "merge", models / "a.safetensors", models / "b.safetensors", "--method", "ta", "-o", tmp_path / "x"
    )
    assert done.returncode == 2 and "unknown merge method 'ta'" in done.stderr and "task-arithmetic" in done.stderr


FLUX_KEYS = ("double_blocks.0.img_attn.qkv.weight", "double_blocks.0.img_mlp.0.bias", "single_blocks.0.linear1.weight")
# A VAE in diffusers' names: a layout Merge Lab does not match to a checkpoint's (see lib_merge/layouts.py).
DIFFUSERS_VAE_KEYS = ("encoder.conv_in.weight", "encoder.down_blocks.0.resnets.0.conv1.weight", "decoder.conv_in.bias")


def test_a_merge_that_would_merge_nothing_is_refused_naming_both_key_layouts(tmp_path):
    """A Flux checkpoint (model.diffusion_model.* keys) and a file with no key in common (a full and
    a bare transformer once were such a pair; they are matched now): the preflight used to say
    "Ready to merge." and write a copy of A."""
    from lib_merge.io.readers import TensorSpec

    spec = TensorSpec(torch.float16, (4, 4))
    full = make(tmp_path / "full.safetensors", specs={f"model.diffusion_model.{k}": spec for k in FLUX_KEYS}, seed=1)
    bare = make(tmp_path / "bare.safetensors", specs=dict.fromkeys(DIFFUSERS_VAE_KEYS, spec), seed=2)
    out = tmp_path / "out.safetensors"
    dry = cli("merge", full, bare, "-o", out, "--dry-run")
    assert dry.returncode == 1 and "Ready to merge" not in dry.stdout
    assert "A: model.* (3 keys); e.g. model.diffusion_model.double_blocks" in dry.stdout
    assert "B: encoder.* (2 keys), decoder.* (1 keys); e.g. decoder.conv_in.bias" in dry.stdout
    done = cli("merge", full, bare, "-o", out)
    assert done.returncode == 1 and "nothing would be merged" in done.stderr and "no key in common" in done.stderr
    assert not out.exists()
    assert cli("merge", full, "--method", "no_interpolation", "-o", out).returncode == 0  # a copy on purpose


def test_a_discard_pattern_that_takes_every_key_is_refused(models, tmp_path):
    done = cli(
        "merge", models / "a.safetensors", models / "b.safetensors", "--discard", ".", "-o", tmp_path / "x.safetensors"
    )
    assert done.returncode == 1 and "discard_weights leaves no key to merge" in done.stderr
