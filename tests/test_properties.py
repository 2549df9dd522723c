"""Identities of the merge, for any values and multipliers (hypothesis), through real files."""

import torch
from conftest import assert_within_one_ulp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lib_merge import FolderHost, MergeRequest, merge
from lib_merge.io.formats import open_checkpoint
from lib_merge.io.readers import TensorSpec
from lib_merge.io.writer import SafetensorsWriter

KEY = "model.diffusion_model.middle_block.0.in_layers.0.weight"
finite_half = st.floats(min_value=-65504, max_value=65504, allow_nan=False, width=16)
values = st.lists(finite_half, min_size=1, max_size=16)
multipliers = st.floats(min_value=-4, max_value=4, allow_nan=False)
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def write(folder, name, data):
    tensor = torch.tensor(data, dtype=torch.float16)
    writer = SafetensorsWriter(
        folder / name, [(KEY, TensorSpec(tensor.dtype, tuple(tensor.shape)))], None, overwrite=True
    )
    writer.add(KEY, tensor)
    writer.finish()
    return tensor


def run(folder, *names, method="Weighted sum", multiplier=0.5):
    host = FolderHost(folder, hash_cache=folder / "hashes.json", device="cpu")
    request = MergeRequest(*names, interp_method=method, multiplier=multiplier, overwrite=True, custom_name="out")
    with open_checkpoint(merge(request, host).path) as reader:
        return reader[KEY].clone()


@SETTINGS
@given(data=st.data())
def test_alpha_zero_gives_a_exactly(tmp_path, data):
    a_values = data.draw(values)
    a = write(tmp_path, "a.safetensors", a_values)
    write(tmp_path, "b.safetensors", data.draw(st.lists(finite_half, min_size=len(a_values), max_size=len(a_values))))
    assert torch.equal(run(tmp_path, "a.safetensors", "b.safetensors", multiplier=0.0), a)


@SETTINGS
@given(data=st.data(), multiplier=multipliers)
def test_weighted_sum_is_symmetric_up_to_one_rounding(tmp_path, data, multiplier):
    a_values = data.draw(values)
    b_values = data.draw(st.lists(finite_half, min_size=len(a_values), max_size=len(a_values)))
    a, b = write(tmp_path, "a.safetensors", a_values), write(tmp_path, "b.safetensors", b_values)
    exact = (1 - multiplier) * a.double() + multiplier * b.double()
    if exact.abs().max() >= 65504:  # out of float16's range: nothing to compare
        return
    forward = run(tmp_path, "a.safetensors", "b.safetensors", multiplier=multiplier)
    backward = run(tmp_path, "b.safetensors", "a.safetensors", multiplier=1 - multiplier)
    assert_within_one_ulp(forward, exact)
    assert_within_one_ulp(backward, exact)


@SETTINGS
@given(data=st.data(), multiplier=multipliers)
def test_add_difference_with_b_equal_c_gives_a(tmp_path, data, multiplier):
    a_values = data.draw(values)
    a = write(tmp_path, "a.safetensors", a_values)
    same = data.draw(st.lists(finite_half, min_size=len(a_values), max_size=len(a_values)))
    write(tmp_path, "b.safetensors", same)
    write(tmp_path, "c.safetensors", same)
    merged = run(
        tmp_path, "a.safetensors", "b.safetensors", "c.safetensors", method="Add difference", multiplier=multiplier
    )
    assert torch.equal(merged, a)
