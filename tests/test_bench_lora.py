"""The LoRA bench (``bench --lora``) at a tiny size: its inputs, its tables and targets, and the wiring
of the kohya contender.

kohya's sd-scripts are NOT run here: a stand-in (``_STANDIN``, written into a fake sd-scripts folder)
takes their place, only to check the command line the bench gives each script, that it runs offline
with the script's folder importable, and that its time and memory reach the table. The real figures
come from a run against the real scripts (README).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from cli_runner import run_cli

from lib_merge import bench_lora, synthetic
from lib_merge.lora.kohya import layer_modules

SD15 = synthetic.scaled(synthetic.layout("sd15"), 8)
BASE = "sd15_max8_a.safetensors"

# Records its argv and environment, holds ~300 MB of anonymous memory for a moment, writes --save_to.
_STANDIN = """
import json, os, sys, time
from pathlib import Path
import lora  # networks/ must be importable, as when the script is run as python networks/X.py
argv = sys.argv[1:]
record = {"script": Path(sys.argv[0]).name, "argv": argv, "offline": os.environ.get("HF_HUB_OFFLINE")}
with open(Path(__file__).parents[1] / "calls.jsonl", "a") as calls:
    calls.write(json.dumps(record) + "\\n")
if os.environ.get("STANDIN_FAIL"):
    sys.exit("standin: no module named diffusers")
held = b"x" * (300 << 20)
time.sleep(0.5)
Path(argv[argv.index("--save_to") + 1]).write_bytes(b"0" * 4096)
"""


def _standin(folder: Path) -> Path:
    for script in ("extract_lora_from_models.py", "merge_lora.py", "sdxl_merge_lora.py"):
        (folder / "networks").mkdir(parents=True, exist_ok=True)
        (folder / "networks" / script).write_text(_STANDIN)
    (folder / "networks" / "lora.py").write_text("")
    return folder


def _bench(work: Path, *args, env=None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "lib_merge", "bench", "--lora", "--max-dim", "8", "--device", "cpu"]
    return subprocess.run([*command, "--work", str(work), *map(str, args)], capture_output=True, text=True, env=env)


def _rows(text: str) -> dict[str, list[str]]:
    """contender -> its row's figures, for one table's text."""
    return {m[1]: m[2].split() for m in re.finditer(r"^(floor|engine|kohya) +([0-9. -]+)$", text, re.M)}


def _tables(stdout: str) -> dict[str, str]:
    """case ("extract", "bake") -> the text of its table."""
    parts = re.split(r"^sd15 (extract|bake): ", stdout, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


@pytest.fixture(scope="module")
def standin_run(tmp_path_factory):
    """One bench of both cases at a tiny size: floor, engine and the stand-in kohya."""
    root = tmp_path_factory.mktemp("lora_bench")
    kohya = _standin(root / "sd-scripts")
    done = _bench(root / "work", "--arch", "sd15", "--kohya", kohya, "--kohya-python", sys.executable)
    assert done.returncode == 0, done.stderr
    calls = [json.loads(line) for line in (kohya / "calls.jsonl").read_text().splitlines()]
    return root / "work", done.stdout, {call["script"]: call for call in calls}


def test_both_cases_print_a_table_of_time_ratio_and_memory(standin_run):
    _, stdout, _ = standin_run
    tables = _tables(stdout)
    assert set(tables) == {"extract", "bake"}, stdout
    for text in tables.values():
        rows = _rows(text)
        assert set(rows) == {"floor", "engine", "kohya"}, text
        seconds, ratio, _cpu, _load, rss, _anon = rows["floor"]
        assert float(seconds) > 0 and ratio == "1.00" and float(rss) > 0.05  # an interpreter with torch
        assert float(rows["engine"][0]) > 0 and float(rows["engine"][4]) > 0.05
        assert "target: engine" in text, text
    assert re.search(r"target: engine <= 1\.3x the floor: (yes|no) \(\d+\.\d\dx\)", tables["bake"])
    assert re.search(r"sd15 bake engine phases \(median s\): \w+ \d", tables["bake"])
    assert re.search(r"target: engine faster than kohya, extra anonymous memory <= 1 GB: (yes|no) ", tables["extract"])


def test_outputs_and_lora_inputs_are_deleted_and_the_base_kept(standin_run):
    work, stdout, _ = standin_run
    assert sorted(path.name for path in work.glob("*.safetensors")) == [BASE]
    assert "disk: the bench's files" in stdout


def test_kohya_scripts_get_their_own_arguments_offline(standin_run):
    work, _, calls = standin_run
    assert set(calls) == {"extract_lora_from_models.py", "merge_lora.py"}
    out = str(work / "bench_kohya.safetensors")
    base, tuned = str(work / BASE), str(work / "sd15_max8_tuned.safetensors")
    assert calls["extract_lora_from_models.py"]["argv"] == [
        *("--model_org", base, "--model_tuned", tuned, "--dim", "64"),
        *("--device", "cpu", "--save_precision", "fp16", "--save_to", out),
    ]
    loras = [str(work / f"sd15_max8_lora{n}_r32.safetensors") for n in (1, 2, 3)]
    assert calls["merge_lora.py"]["argv"] == [
        *("--sd_model", base, "--models", *loras, "--ratios", "0.8", "0.6", "0.4"),
        *("--save_precision", "fp16", "--save_to", out),
    ]
    assert all(call["offline"] == "1" for call in calls.values())


def test_kohya_memory_and_time_reach_the_table(standin_run):
    _, stdout, _ = standin_run
    for text in _tables(stdout).values():
        seconds, _ratio, _cpu, _load, rss, anon = _rows(text)["kohya"]
        assert float(seconds) >= 0.5  # the stand-in sleeps 0.5 s
        assert 0.3 <= float(anon) < 0.6 and float(rss) >= float(anon)  # it holds 315 MB above torch


def test_a_failing_kohya_script_is_a_row_not_the_end(tmp_path):
    kohya = _standin(tmp_path / "sd-scripts")
    env = {**__import__("os").environ, "STANDIN_FAIL": "1"}
    done = _bench(
        tmp_path / "work", "--lora-cases", "bake", "--arch", "sd15", "--contenders", "floor", "--kohya", kohya, env=env
    )
    assert done.returncode == 0, done.stderr
    assert re.search(r"^kohya +failed after \d+ s: standin: no module named diffusers$", done.stdout, re.M), done.stdout
    assert not (tmp_path / "work" / "bench_kohya.safetensors").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--arch", "flux"), "--arch: the LoRA bench takes sd15, sdxl, got flux"),
        (("--arch", "sd15", "--kohya", "."), "has no networks/extract_lora_from_models.py"),
    ],
)
def test_refused_options_name_themselves(tmp_path, args, message):
    done = _bench(tmp_path, *args)
    assert done.returncode == 1 and message in done.stderr, done.stderr


def test_the_merge_bench_takes_one_arch(tmp_path):
    done = run_cli("bench", "--arch", "sd15,sdxl", "--work", tmp_path)
    assert done.returncode == 1 and "--arch: one at a time" in done.stderr


def test_random_loras_have_a_module_for_every_layer_kohya_reaches(tmp_path):
    path = tmp_path / "lora.safetensors"
    bench_lora.write_random_lora(path, SD15, "sd15", rank=4, seed=11)
    lora = safetensors.torch.load_file(str(path))
    names = {key.split(".")[0] for key in lora}
    expected = layer_modules(SD15, lambda key: SD15[key].shape, "SD1", conv=True, text_encoder=True)
    assert names == {module.name for module in expected}
    for name in (
        "lora_te_text_model_encoder_layers_11_mlp_fc2",
        "lora_unet_down_blocks_0_resnets_0_conv1",
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2",
        "lora_unet_mid_block_attentions_0_proj_in",
    ):
        assert name in names
        assert lora[f"{name}.lora_down.weight"].dtype == torch.float16
        assert lora[f"{name}.alpha"].item() == lora[f"{name}.lora_down.weight"].shape[0]


def test_the_tuned_checkpoint_is_the_base_plus_a_small_change(tmp_path):
    base, tuned = tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"
    specs = synthetic.with_dtype(SD15, torch.float16)
    synthetic.write_checkpoint(base, specs, seed=1)
    bench_lora.write_tuned(base, tuned, specs, seed=2)
    a, b = safetensors.torch.load_file(str(base)), safetensors.torch.load_file(str(tuned))
    assert a.keys() == b.keys()
    change = torch.cat([(b[k].double() - a[k].double()).flatten() for k in a if a[k].dtype.is_floating_point])
    assert 0.03 < change.std().item() < 0.07 and change.abs().max().item() > 0.01  # above kohya's min_diff
    assert all(torch.equal(a[k], b[k]) for k in a if not a[k].dtype.is_floating_point)


def _results(floor=None, engine=None, kohya=None, anon=0):
    results = {"engine": [{"seconds": engine, "peak_anon": anon}]}
    if floor is not None:
        results["floor"] = [{"seconds": floor, "peak_anon": 0}]
    if kohya is not None:
        results["kohya"] = [{"seconds": kohya, "peak_anon": 0}]
    return results


@pytest.mark.parametrize(
    ("kind", "results", "met"),
    [
        ("bake", _results(floor=10.0, engine=12.9), "yes (1.29x)"),
        ("bake", _results(floor=10.0, engine=13.2), "no (1.32x)"),
        ("extract", _results(engine=50.0, kohya=200.0, anon=int(0.9e9)), "yes (4.0x faster)"),
        ("extract", _results(engine=50.0, kohya=40.0, anon=int(0.9e9)), "no (time 1.25x kohya's)"),
        ("extract", _results(engine=50.0, kohya=200.0, anon=int(1.2e9)), "no (memory 1.20 GB)"),
        ("extract", _results(engine=50.0, anon=int(0.5e9)), "- (no kohya time)"),
    ],
)
def test_targets(kind, results, met):
    _, said = bench_lora.targets(bench_lora.LoraCase("sd15", kind, 64), results)
    assert said == met
