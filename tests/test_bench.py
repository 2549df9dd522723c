"""The benchmark's big layouts (Flux dev, SD3.5 large), its disk plan and its memory guard: fast
checks only (no multi-GB files; the real figures are in the README)."""

from __future__ import annotations

import json
import re
import sys
from math import prod
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli

from lib_merge import bench, synthetic
from lib_merge.arch import family_of

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PREFIX = "model.diffusion_model."


def _params(specs) -> int:
    return sum(prod(spec.shape) for spec in specs.values())


def test_flux_layout_is_the_dev_transformer_at_11_9_gb_in_fp8():
    specs = synthetic.layout("flux")
    assert len(specs) == 780 and all(key.startswith(PREFIX) for key in specs)
    fp8 = synthetic.with_dtype(specs, torch.float8_e4m3fn)
    assert sum(spec.nbytes for spec in fp8.values()) == pytest.approx(11.9e9, rel=0.005)
    assert family_of(specs) == "Flux dev"


@pytest.mark.skipif(not (SHARED / "flux_shapes.json").exists(), reason="needs ../shared/data")
def test_flux_layout_is_the_full_tables_transformer():
    full = synthetic.specs_from_table(json.loads((SHARED / "flux_shapes.json").read_text()))
    assert synthetic.layout("flux") == {k: v for k, v in full.items() if k.startswith(PREFIX)}


def test_sd35_large_layout_has_8_1g_parameters_in_38_joint_blocks():
    specs = synthetic.layout("sd35")
    assert _params(specs) == pytest.approx(8.1e9, rel=0.01)
    blocks = {int(m[1]) for key in specs if (m := re.match(rf"{re.escape(PREFIX)}joint_blocks\.(\d+)\.", key))}
    assert blocks == set(range(38)) and family_of(specs) == "SD3.5 large"
    hidden = 64 * 38
    block = f"{PREFIX}joint_blocks.0."
    assert specs[block + "x_block.attn.qkv.weight"].shape == (3 * hidden, hidden)
    assert specs[block + "context_block.mlp.fc1.weight"].shape == (4 * hidden, hidden)
    assert specs[block + "x_block.adaLN_modulation.1.weight"].shape == (6 * hidden, hidden)
    assert specs[block + "context_block.attn.ln_q.weight"].shape == (64,)
    assert specs[PREFIX + "pos_embed"].shape == (1, 192 * 192, hidden)
    assert specs[PREFIX + "context_embedder.weight"].shape == (hidden, 4096)
    last = sorted(key[len(f"{PREFIX}joint_blocks.37.context_block.") :] for key in specs if ".37.context_block." in key)
    assert last == [
        "adaLN_modulation.1.bias",
        "adaLN_modulation.1.weight",
        "attn.ln_k.weight",
        "attn.ln_q.weight",
        "attn.qkv.bias",
        "attn.qkv.weight",
    ]
    assert specs[f"{PREFIX}joint_blocks.37.context_block.adaLN_modulation.1.weight"].shape == (2 * hidden, hidden)


@pytest.mark.skipif(not (SHARED / "sd3_shapes.json").exists(), reason="needs ../shared/data")
def test_sd35_large_layout_is_derived_from_the_sd3_medium_table():
    medium = synthetic.specs_from_table(json.loads((SHARED / "sd3_shapes.json").read_text()))
    assert synthetic.sd35_large_from_sd3_medium(medium) == synthetic.layout("sd35")


def test_random_fp8_values_are_the_normal_pool_cast():
    specs = synthetic.with_dtype(synthetic.scaled(synthetic.layout("flux"), 8), torch.float8_e4m3fn)
    wide = synthetic.with_dtype(specs, torch.float32)
    pairs = zip(synthetic.random_tensors(specs, 3), synthetic.random_tensors(wide, 3), strict=True)
    for (_, fp8), (_, fp32) in pairs:
        assert fp8.dtype == torch.float8_e4m3fn
        assert torch.equal(fp8.view(torch.uint8), fp32.to(fp8.dtype).view(torch.uint8))


def _flux_cases():
    fp8, bf16 = 11.9e9, 23.8e9
    return [
        bench.Case("Add difference", 1.0, "bf16", 3, int(bf16)),
        bench.Case("Add difference", 1.0, "fp8_e4m3fn", 3, int(fp8)),
        bench.Case("Weighted sum", 0.5, "fp8_e4m3fn", 2, int(fp8)),
        bench.Case("Weighted sum", 0.5, "bf16", 2, int(bf16)),
    ]


def test_disk_plan_runs_two_input_cases_first_and_fits_a_64_gb_disk():
    plan = bench.plan_disk(_flux_cases(), int(11.9e9), made=0, free=int(62e9))
    assert [case.inputs for case in plan.order] == [2, 2, 3, 3]
    assert plan.unfit == [] and plan.peak == pytest.approx(3 * 11.9e9 + 23.8e9)
    assert plan.peak < 64e9


def test_disk_plan_names_the_cases_the_free_space_cannot_hold():
    plan = bench.plan_disk(_flux_cases(), int(11.9e9), made=0, free=int(50e9))
    assert [(case.method, case.dtype) for case in plan.unfit] == [("Add difference", "bf16")]
    assert plan.peak == pytest.approx(3 * 11.9e9 + 11.9e9)
    # Inputs already on disk need no new space; the reserve left to others does.
    made = bench.plan_disk(_flux_cases(), int(11.9e9), made=3, free=int(26e9))
    assert made.unfit == [] and made.needed == pytest.approx(23.8e9)
    reserved = bench.plan_disk(_flux_cases(), int(11.9e9), made=2, free=int(30e9), reserve=int(10e9))
    assert [(case.method, case.dtype) for case in reserved.order if case not in reserved.unfit] == [
        ("Weighted sum", "fp8_e4m3fn")
    ]


def test_guard_stops_a_child_past_its_memory_limit_and_says_so():
    hog = (
        "import time; print('base 0', flush=True); held = []\n"
        "for _ in range(200): held.append(bytearray(b'x') * (16 << 20)); time.sleep(0.005)"
    )
    done = bench.run_guarded([sys.executable, "-c", hog], limit=200_000_000)
    assert done["oom"] and "limit of 0.2 GB" in done["why"]
    assert 200e6 < done["peak_anon"] < 400e6


def test_guard_passes_a_child_under_its_limit():
    done = bench.run_guarded([sys.executable, "-c", "print('base 0', flush=True); print('{}')"], limit=10**9)
    assert not done["oom"] and done["returncode"] == 0 and done["stdout"] == "{}\n"


def test_an_oom_row_is_printed_not_raised(capsys):
    args = type("Args", (), {"targets": True})()
    case = bench.Case("Weighted sum", 0.5, "bf16", 2, 1)
    oom = {"failed": "out of memory", "oom": True, "why": "past the limit of 20.0 GB", "peak_anon": 20.1e9}
    results = {
        "floor": [{"seconds": 2.0, "cpu": 0.5, "load": 1.0, "peak_anon": 0}],
        "engine": [{"seconds": 2.4, "cpu": 2.2, "load": 1.5, "peak_anon": 10**8}],
        "baseline": [{**oom, "seconds": 61}],
    }
    bench._print_case(args, (case, results, ""), header=False)
    out = capsys.readouterr().out
    assert "baseline  OOM: stopped at 20.1 GB" in out and "after 61 s" in out
    assert re.search(r"engine\s+2\.40\s+1\.20\s+2\.2\s+1\.5\s+0\.10\s+yes", out)


def _cli(*args):
    return run_cli("bench", *args)


@pytest.mark.parametrize(
    ("arch", "method", "dtype"), [("flux", "weighted-sum", "fp8_e4m3fn"), ("sd35", "add-difference", "bf16")]
)
def test_big_arch_bench_runs_small_and_deletes_its_inputs(tmp_path, arch, method, dtype):
    work = tmp_path / "work"
    done = _cli("--arch", arch, "--max-dim", "8", "--method", method, "--dtype", dtype, "--work", work)
    assert done.returncode == 0, done.stderr
    rows = {m[1]: m for m in re.finditer(r" (floor|engine|baseline) +([0-9.]+) +([0-9.]+) ", done.stdout)}
    assert set(rows) == {"floor", "engine", "baseline"} and float(rows["floor"][3]) == 1.0, done.stdout
    assert "disk plan:" in done.stdout and "took" in done.stdout
    assert not list(work.glob("*.safetensors")), "the inputs and outputs are deleted at the end"
