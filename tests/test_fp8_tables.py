"""fp8 inputs merged by table (lib_merge/fp8_tables.py): the bytes of the float64 slice-by-slice
path for every combination of input bytes (NaN codes included), each output precision, both fp8
kinds, block weights; and the tables are really used. The reference is the same merge with the
tables switched off."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from conftest import assert_within_one_ulp, load, make

from lib_merge import FolderHost, MergeRequest, engine, fp8_tables, merge
from lib_merge.fp8_tables import Fp8Tables
from lib_merge.recipe import MergeNode, ModelRef

KEY = "model.diffusion_model.values"
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def every_combination(count: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """``count`` fp8 tensors whose elements, read together, are every combination of bytes."""
    rows = torch.arange(256**count, dtype=torch.int64)
    return [((rows >> (8 * place)) & 255).to(torch.uint8).view(dtype) for place in reversed(range(count))]


@pytest.fixture
def table_use(monkeypatch):
    """Counts the keys merged by table."""
    used = []
    apply = Fp8Tables.apply

    def counting(self, step, key, *args):
        done = apply(self, step, key, *args)
        if done:
            used.append(key)
        return done

    monkeypatch.setattr(Fp8Tables, "apply", counting)
    return used


def merged_both_ways(host, request: MergeRequest, monkeypatch) -> tuple[dict, dict]:
    """The merge with tables, then without (the float64 path everywhere)."""
    with_tables = load(merge(request, host).path)
    with monkeypatch.context() as patch:
        patch.setattr(Fp8Tables, "apply", lambda *args: False)
        without = load(merge(MergeRequest(**{**request.__dict__, "custom_name": "float64"}), host).path)
    return with_tables, without


def assert_same_bytes(with_tables: dict, without: dict) -> None:
    assert with_tables.keys() == without.keys()
    for key, tensor in with_tables.items():
        assert tensor.dtype == without[key].dtype, key
        assert torch.equal(tensor.view(torch.uint8), without[key].view(torch.uint8)), key


def folder(tmp_path, tensors: list[torch.Tensor]) -> FolderHost:
    models = tmp_path / "models"
    models.mkdir()
    for name, tensor in zip("abc", tensors, strict=False):
        safetensors.torch.save_file({KEY: tensor}, str(models / f"{name}.safetensors"))
    return FolderHost(models, hash_cache=tmp_path / "hashes.json", device="cpu")


@pytest.mark.parametrize("dtype", ["", "keep", "fp8_e4m3fn", "fp8_e5m2", "bf16", "fp16", "fp32"])
def test_a_weighted_sum_by_table_writes_the_float64_paths_bytes_for_every_pair(tmp_path, monkeypatch, table_use, dtype):
    host = folder(tmp_path, every_combination(2, E4M3))
    request = MergeRequest("a.safetensors", "b.safetensors", multiplier=0.3, dtype=dtype, custom_name="tables")
    with_tables, without = merged_both_ways(host, request, monkeypatch)
    assert table_use == [KEY]
    assert_same_bytes(with_tables, without)
    assert with_tables[KEY].isnan().sum() > 0  # the NaN codes went through both ways


def test_mixed_fp8_kinds_by_table_promote_to_float16_as_the_float64_path_does(tmp_path, monkeypatch, table_use):
    a, b = every_combination(2, E4M3)
    host = folder(tmp_path, [a, b.view(torch.uint8).view(E5M2)])
    request = MergeRequest("a.safetensors", "b.safetensors", multiplier=0.7, custom_name="tables")
    with_tables, without = merged_both_ways(host, request, monkeypatch)
    assert table_use == [KEY] and with_tables[KEY].dtype == torch.float16
    assert_same_bytes(with_tables, without)


@pytest.mark.parametrize("dtype", ["fp8_e4m3fn", "bf16"])
@pytest.mark.parametrize("form", ["two parts", "flat"])
def test_add_difference_by_table_writes_the_float64_paths_bytes_for_every_triple(
    tmp_path, monkeypatch, table_use, dtype, form
):
    """16.7 M elements: every (A, B, C) byte triple once, through the table in two parts (B and C
    act only through B - C) and, with the classes capped, through the flat table; looked up by
    three threads (whatever this machine's cores), each a span of the tensor."""
    if form == "flat":
        monkeypatch.setattr(fp8_tables, "MAX_CLASSES", 0)
    spans = []
    look_up = Fp8Tables._look_up
    monkeypatch.setattr(engine, "Fp8Tables", lambda *args, helpers: Fp8Tables(*args, helpers=2))
    monkeypatch.setattr(Fp8Tables, "_look_up", lambda self, *args: spans.append(args[3]) or look_up(self, *args))
    splits, split = [], fp8_tables._TwoPartTable.split.__func__

    def recording(cls, flat):
        splits.append(split(cls, flat))
        return splits[-1]

    monkeypatch.setattr(fp8_tables._TwoPartTable, "split", classmethod(recording))
    host = folder(tmp_path, every_combination(3, E4M3))
    request = MergeRequest(
        "a.safetensors", "b.safetensors", "c.safetensors", interp_method="Add difference", multiplier=1.0,
        dtype=dtype, custom_name="tables",
    )  # fmt: skip
    with_tables, without = merged_both_ways(host, request, monkeypatch)
    assert table_use == [KEY]
    assert sorted(spans) == [(0, 5_505_024), (5_505_024, 11_010_048), (11_010_048, 256**3)]
    assert_same_bytes(with_tables, without)
    [two_parts] = splits
    if form == "flat":
        assert two_parts is None
    else:  # far smaller than the 16.7 M entries of the flat table
        assert two_parts.results.numel() < 256**3 // 3 and two_parts.classes.numel() == 256**2


def test_block_weights_build_a_table_per_value_and_write_the_float64_paths_bytes(tmp_path, monkeypatch, table_use):
    models = tmp_path / "models"
    make(models / "a.safetensors", seed=1, dtype=E4M3)
    make(models / "b.safetensors", seed=2, dtype=E4M3)
    host = FolderHost(models, hash_cache=tmp_path / "hashes.json", device="cpu")
    monkeypatch.setattr(fp8_tables, "BUILD_SHARE", 1 << 20)  # the test model's small keys too
    node = MergeNode(
        "weighted_sum",
        (ModelRef("a.safetensors"), ModelRef("b.safetensors")),
        {"alpha": 0.5},
        {"alpha": "IN*=0.2,OUT*=0.9"},
    )
    request = MergeRequest("a.safetensors", tree=node, dtype="fp8_e4m3fn", custom_name="tables")
    with_tables, without = merged_both_ways(host, request, monkeypatch)
    assert any(".input_blocks." in key for key in table_use) and any(".output_blocks." in key for key in table_use)
    assert_same_bytes(with_tables, without)
    a, b = load(models / "a.safetensors"), load(models / "b.safetensors")
    for block, alpha in ((".input_blocks.", 0.2), (".output_blocks.", 0.9)):
        key = next(key for key in table_use if block in key)
        assert_within_one_ulp(with_tables[key], torch.lerp(a[key].double(), b[key].double(), alpha), key)


def test_small_keys_and_non_fp8_inputs_take_the_float64_path(tmp_path, monkeypatch, table_use):
    models = tmp_path / "models"
    make(models / "a.safetensors", seed=1, dtype=E4M3)
    make(models / "b.safetensors", seed=2)  # float16: no table
    host = FolderHost(models, hash_cache=tmp_path / "hashes.json", device="cpu")
    merge(MergeRequest("a.safetensors", "b.safetensors", dtype="fp8_e4m3fn", custom_name="mixed"), host)
    assert table_use == []
