"""The built-in's semantics, key by key, against an independent float64 reference."""

import collections

import pytest
import torch
from builtin_reference import reference_merge
from conftest import POSITION_IDS, SD15, UNET_IN, assert_within_one_ulp, load, make, variant_specs

from lib_merge import IncompatibleModelsError, MergeRequest, OutputError, merge


def merge_and_check(request, host, models):
    """Merge, then compare every key with the float64 reference of the same request."""
    result = merge(request, host)
    names = (request.primary_model_name, request.secondary_model_name, request.tertiary_model_name)
    inputs = [load(models / name) if name else {} for name in names]
    vae = load(models / request.bake_in_vae) if request.vae_name else None
    options = {"save_as_half": request.save_as_half, "vae": vae, "discard": request.discard_weights}
    exact, _ = reference_merge(*inputs, request.interp_method, request.multiplier, **options)
    out = load(result.path)
    assert set(out) == set(exact)
    for key, (value, dtype) in exact.items():
        assert out[key].dtype == dtype, key
        assert out[key].shape == value.shape, key
        if dtype.is_floating_point:
            assert_within_one_ulp(out[key], value, key)
        else:
            assert torch.equal(out[key], value.to(dtype)), key
    return result


@pytest.mark.parametrize("multiplier", [0.0, 0.3, 0.5, 1.0, -0.7, 1.8])
def test_weighted_sum_matches_the_builtin(host, models, multiplier):
    request = MergeRequest("a.safetensors", "b.safetensors", multiplier=multiplier, custom_name="out")
    merge_and_check(request, host, models)


@pytest.mark.parametrize("multiplier", [1.0, 0.45, -2.5])
def test_add_difference_matches_the_builtin_and_missing_c_keys_add_zero(host, models, multiplier):
    c = load(models / "c.safetensors")
    dropped = [k for k in c if "diffusion_model.output_blocks" in k]
    make(models / "c_partial.safetensors", specs={k: v for k, v in SD15.items() if k not in dropped}, seed=3)
    request = MergeRequest(
        "a.safetensors", "b.safetensors", "c_partial.safetensors", "Add difference", multiplier, custom_name="out"
    )
    result = merge_and_check(request, host, models)
    out, a = load(result.path), load(models / "a.safetensors")
    assert all(torch.equal(out[k], a[k]) for k in dropped)


def test_position_ids_and_keys_without_model_are_copied_from_a_and_b_only_keys_dropped(host, models):
    extra = {**SD15, "model.only_in_b.weight": SD15[UNET_IN]}
    make(models / "b_extra.safetensors", specs=extra, seed=9)
    result = merge(MergeRequest("a.safetensors", "b_extra.safetensors", multiplier=0.5, custom_name="out"), host)
    out, a = load(result.path), load(models / "a.safetensors")
    assert "model.only_in_b.weight" not in out
    assert torch.equal(out[POSITION_IDS], a[POSITION_IDS])
    assert torch.equal(out["betas"], a["betas"])
    assert not torch.equal(out[UNET_IN], a[UNET_IN])


@pytest.mark.parametrize(("channels", "variant"), [(9, "inpainting"), (8, "instruct-pix2pix")])
def test_inpainting_and_pix2pix_merge_the_first_four_channels(host, models, channels, variant):
    make(models / "special.safetensors", specs=variant_specs(SD15, channels), seed=5)
    result = merge_and_check(MergeRequest("special.safetensors", "b.safetensors", multiplier=0.4), host, models)
    assert result.path.name == f"0.6(special) + 0.4(b).{variant}.safetensors"
    assert result.recipe[f"is_{variant.replace('-', '_')}"] is True
    out, a = load(result.path), load(models / "special.safetensors")
    assert torch.equal(out[UNET_IN][:, 4:], a[UNET_IN][:, 4:])


@pytest.mark.parametrize(
    ("channels", "message"),
    [(9, "A must be the inpainting model."), (8, "A must be the instruct-pix2pix model.")],
)
def test_the_reverse_order_is_refused_with_the_builtins_words(host, models, channels, message):
    make(models / "special.safetensors", specs=variant_specs(SD15, channels), seed=5)
    with pytest.raises(IncompatibleModelsError, match=message):
        merge(MergeRequest("a.safetensors", "special.safetensors", multiplier=0.4), host)
    assert not list(host.output_dir().glob("*(special)*"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_as_half_converts_float32_results_only(host, models, dtype):
    make(models / "a32.safetensors", seed=1, dtype=dtype)
    make(models / "b32.safetensors", seed=2, dtype=dtype)
    request = MergeRequest("a32.safetensors", "b32.safetensors", multiplier=0.25, save_as_half=True)
    result = merge_and_check(request, host, models)
    out = load(result.path)
    assert out[UNET_IN].dtype == (torch.float16 if dtype == torch.float32 else torch.bfloat16)
    assert out["betas"].dtype == dtype  # not merged: kept as stored, as in the built-in


def test_mixed_dtypes_follow_type_promotion(host, models):
    make(models / "a32.safetensors", seed=1, dtype=torch.float32)
    result = merge_and_check(MergeRequest("a32.safetensors", "b.safetensors", multiplier=0.5), host, models)
    assert load(result.path)[UNET_IN].dtype == torch.float32


def test_no_interpolation_with_half_converts_every_float32_tensor(host, models):
    make(models / "a32.safetensors", seed=1, dtype=torch.float32)
    with pytest.raises(OutputError, match="is one of the inputs"):  # the built-in would overwrite A here
        merge(
            MergeRequest("a32.safetensors", interp_method="No interpolation", save_as_half=True, overwrite=True), host
        )
    request = MergeRequest("a32.safetensors", interp_method="No interpolation", save_as_half=True, custom_name="a16")
    merge_and_check(request, host, models)


def test_discard_weights_is_a_regex_search(host, models):
    request = MergeRequest(
        "a.safetensors", "b.safetensors", discard_weights=r"model_ema|^first_stage", custom_name="out"
    )
    out = load(merge_and_check(request, host, models).path)
    assert not [k for k in out if k.startswith("first_stage_model.")]


def test_vae_bake_in_replaces_first_stage_keys(host, models, tmp_path):
    vae_specs = {k[len("first_stage_model.") :]: v for k, v in SD15.items() if k.startswith("first_stage_model.")}
    vae_specs["loss.logvar"] = SD15["betas"]
    vae = make(models / "vae.safetensors", specs=vae_specs, seed=7, dtype=torch.float32)
    request = MergeRequest(
        "a.safetensors", "b.safetensors", multiplier=0.5, bake_in_vae=vae.name, save_as_half=True, custom_name="out"
    )
    result = merge_and_check(request, host, models)
    out, v = load(result.path), load(vae)
    key = "decoder.conv_in.weight"
    assert torch.equal(out[f"first_stage_model.{key}"], v[key].half())
    assert "first_stage_model.loss.logvar" not in out


def test_values_stay_within_one_ulp_under_cancellation_and_extrapolation(host, models):
    """Values where float32 arithmetic is off by hundreds of ulp (a heavy cancellation)."""
    a = torch.tensor([-4936.0, 1000.0, 65504.0, 3.0e-5, -2.0], dtype=torch.float16)
    b = torch.tensor([-11808.0, -0.0010004, 65504.0, -3.0e-5, 2.0], dtype=torch.float16)
    key = "model.diffusion_model.out.2.bias"
    from lib_merge.io.readers import TensorSpec
    from lib_merge.io.writer import SafetensorsWriter

    for name, tensor in (("x.safetensors", a), ("y.safetensors", b)):
        writer = SafetensorsWriter(models / name, [(key, TensorSpec(torch.float16, (5,)))], None)
        writer.add(key, tensor)
        writer.finish()
    for multiplier in (-0.718, 0.49999, 0.5, 1.0000001, 2.7):
        result = merge(
            MergeRequest("x.safetensors", "y.safetensors", multiplier=multiplier, overwrite=True, custom_name="z"), host
        )
        exact = (1 - multiplier) * a.double() + multiplier * b.double()
        out = load(result.path)[key]
        assert_within_one_ulp(out, exact, f"M={multiplier}")


def test_incompatible_architectures_are_refused_naming_a_key(host, models):
    from conftest import SDXL

    make(models / "xl.safetensors", specs=SDXL, seed=4)
    with pytest.raises(
        IncompatibleModelsError,
        match=r"A is SD1 \(a\.safetensors\), B is SDXL \(xl\.safetensors\).*key model\.diffusion_model\.",
    ):
        merge(MergeRequest("a.safetensors", "xl.safetensors"), host)
    assert sorted(p.name for p in models.iterdir()) == [
        "a.safetensors",
        "b.safetensors",
        "c.safetensors",
        "xl.safetensors",
    ]


@pytest.mark.parametrize("save_as_half", [False, True])
def test_past_the_page_cache_mapped_or_streamed_the_output_is_the_same(host, models, monkeypatch, save_as_half):
    """The second merge stands in for an OS or filesystem without O_DIRECT (this one has it, unless
    the first merge maps too), where the engine computes into the mapped output file; the third for
    one that cannot preallocate either, where it streams with write()."""
    from lib_merge.io import mapped_writer, staged_writer

    slots = collections.Counter()
    for writer in (staged_writer.StagedSafetensorsWriter, mapped_writer.MappedSafetensorsWriter):
        monkeypatch.setattr(
            writer,
            "slot",
            lambda w, key, slot=writer.slot, name=writer.__name__: slots.update([name]) or slot(w, key),
        )
    request = MergeRequest(
        "a.safetensors", "b.safetensors", custom_name="out", multiplier=0.3, save_as_half=save_as_half, overwrite=True
    )
    first = "StagedSafetensorsWriter" if direct_io_works(models) else "MappedSafetensorsWriter"
    outputs = []
    for stand_in in (None, (staged_writer, "O_DIRECT"), (mapped_writer, "_FALLOCATE")):
        if stand_in is not None:
            monkeypatch.setattr(*stand_in, None)
        result = merge(request, host)
        outputs.append((result.sha256, result.path.read_bytes(), dict(slots)))
    placed = outputs[0][2][first]
    assert placed > 0 and outputs[0][2] == {first: placed}
    mapped = outputs[1][2]["MappedSafetensorsWriter"]
    assert mapped == placed * (2 if first == "MappedSafetensorsWriter" else 1)
    assert outputs[1][2] == {**outputs[0][2], "MappedSafetensorsWriter": mapped}
    assert outputs[2][2] == outputs[1][2]  # the third merge placed nothing
    assert outputs[0][:2] == outputs[1][:2] == outputs[2][:2]


def direct_io_works(folder) -> bool:
    from lib_merge.io.staged_writer import DirectIOUnsupported, StagedSafetensorsWriter

    try:
        StagedSafetensorsWriter(folder / "probe.safetensors", [], None).abort()
        return True
    except DirectIOUnsupported:
        return False


def test_inputs_and_output_go_past_the_page_cache_by_whether_they_fit_in_memory(host, models, monkeypatch):
    """Stand-in for inputs larger than the memory available (these are small): ``memory_holds`` is
    told what the inputs and the output weigh, and answers. Where they fit, the output is written
    past the page cache; where not, the inputs are read past it (every tensor here counts as big)
    and the output is written through it from the same buffers. The same bytes either way."""
    from lib_merge import engine
    from lib_merge.io import direct_reads, readers, staged_writer

    if not direct_io_works(models):
        pytest.skip("this filesystem cannot write past the page cache")
    monkeypatch.setattr(readers, "SMALL_BYTES", 1)
    asked, writers, taken = [], [], collections.Counter()
    make_writer = staged_writer.StagedSafetensorsWriter.__init__
    take = direct_reads.DirectReads.take
    monkeypatch.setattr(
        staged_writer.StagedSafetensorsWriter,
        "__init__",
        lambda w, *a, **k: writers.append(k.get("past_cache", True)) or make_writer(w, *a, **k),
    )
    monkeypatch.setattr(direct_reads.DirectReads, "take", lambda r, *a: taken.update([r.path.name]) or take(r, *a))
    outputs = []
    for fits in (True, False):
        monkeypatch.setattr(engine, "memory_holds", lambda nbytes, fits=fits: asked.append(nbytes) or fits)
        request = MergeRequest("a.safetensors", "b.safetensors", custom_name="out", multiplier=0.3, overwrite=True)
        result = merge(request, host)
        outputs.append((result.sha256, result.path.read_bytes()))
        if fits:
            assert writers == [True] and not taken
    inputs = sum((models / name).stat().st_size for name in ("a.safetensors", "b.safetensors"))
    assert asked == [inputs + len(outputs[0][1])] * 2
    assert writers == [True, False]
    # Every key starts from A; B's keys are the merged ones (see SKIP_ON_MERGE).
    assert taken["a.safetensors"] == len(SD15) and 0 < taken["b.safetensors"] < len(SD15)
    assert outputs[0] == outputs[1]


def test_an_input_the_page_cache_does_not_hold_is_read_past_it_even_where_all_fit(host, models, monkeypatch):
    """The real page cache: A is evicted from it (as after a reboot), B is not. Where the inputs and
    the output fit in memory, A's tensors are read past the page cache and B's through it, the
    output is written past it, and the bytes are those of the merge with both inputs in memory.
    A is evicted once the merge has read its header: these files are so small that reading the
    header brings the tensors in by the kernel's readahead."""
    from test_readers_writer import evicted

    from lib_merge.io import direct_reads, readers

    if not direct_io_works(models):
        pytest.skip("this filesystem cannot write past the page cache")
    monkeypatch.setattr(readers, "SMALL_BYTES", 1)
    taken, cold, told = collections.Counter(), set(), {}
    take = direct_reads.DirectReads.take
    monkeypatch.setattr(direct_reads.DirectReads, "take", lambda r, *a: taken.update([r.path.name]) or take(r, *a))
    in_page_cache = readers.SafetensorsReader.in_page_cache

    def evicted_first(reader):
        if reader.path.name in cold:
            evicted(reader.path)
        told[reader.path.name] = in_page_cache(reader)
        return told[reader.path.name]

    monkeypatch.setattr(readers.SafetensorsReader, "in_page_cache", evicted_first)
    outputs = []
    for evict in ((), ("a.safetensors",)):
        cold.update(evict)
        request = MergeRequest("a.safetensors", "b.safetensors", custom_name="out", multiplier=0.3, overwrite=True)
        result = merge(request, host)  # the inputs' hashes are cached by the first merge: not read again
        outputs.append((result.sha256, result.path.read_bytes()))
        if not evict:
            assert told == {"a.safetensors": True, "b.safetensors": True} and not taken
    if told["a.safetensors"]:
        pytest.skip("this filesystem keeps evicted pages, or cannot tell")
    assert told["b.safetensors"] is True
    assert taken == {"a.safetensors": len(SD15)}
    assert outputs[0] == outputs[1]
