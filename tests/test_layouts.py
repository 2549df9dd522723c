"""Keys matched across the layouts people mix: a full Flux checkpoint with a bare or diffusers-named
transformer, a text encoder or VAE file with a full checkpoint's part, each on real files with real
key names; the output in the primary's layout, and the preflight saying how each input was read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import SD15, assert_within_one_ulp, load, make
from test_cli import cli
from transformer_layouts import (
    FLUX_DIMS,
    FLUX_TINY_DIMS,
    UNET,
    as_diffusers,
    flux_specs,
    sd3_keys,
    tiny_specs,
)

from lib_merge import FolderHost, IncompatibleModelsError, InputError, MergeRequest, make_plan, merge
from lib_merge import layouts as layout_kinds
from lib_merge.flux_diffusers import bfl_sources
from lib_merge.io.formats import open_checkpoint
from lib_merge.io.matched import Joined, MatchedReader, joined_spec
from lib_merge.io.readers import CheckpointReader, TensorSpec
from lib_merge.layouts import detect
from lib_merge.matching import match_inputs

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
H = FLUX_TINY_DIMS["hidden"]
CLIP_L = "text_encoders.clip_l.transformer."
T5XXL = "text_encoders.t5xxl.transformer."


@pytest.fixture(autouse=True)
def private_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture
def folder(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    return models


@pytest.fixture
def host(folder, tmp_path) -> FolderHost:
    return FolderHost(folder, hash_cache=tmp_path / "hashes.json", device="cpu")


# -- parts people keep in files of their own (Hugging Face / LDM names, tiny shapes) ----------------


def clip_text_keys(layers: int = 2) -> list[str]:
    """transformers' CLIPTextModel: what a CLIP-L file (and a full checkpoint's clip_l) holds."""
    keys = ["text_model.embeddings.position_embedding.weight", "text_model.embeddings.token_embedding.weight"]
    for i in range(layers):
        layer = f"text_model.encoder.layers.{i}."
        for module in ("layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
            keys += [f"{layer}{module}.bias", f"{layer}{module}.weight"]
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            keys += [f"{layer}self_attn.{proj}.bias", f"{layer}self_attn.{proj}.weight"]
    return [*keys, "text_model.final_layer_norm.bias", "text_model.final_layer_norm.weight"]


def t5_encoder_keys(blocks: int = 2) -> list[str]:
    """transformers' T5EncoderModel: a t5xxl file."""
    keys = ["shared.weight", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    for i in range(blocks):
        block = f"encoder.block.{i}.layer."
        keys += [f"{block}0.SelfAttention.{w}.weight" for w in "qkvo"] + [f"{block}0.layer_norm.weight"]
        keys += [f"{block}1.DenseReluDense.{w}.weight" for w in ("wi_0", "wi_1", "wo")]
        keys += [f"{block}1.layer_norm.weight"]
    return [*keys, "encoder.final_layer_norm.weight"]


def vae_keys() -> list[str]:
    """The original (LDM) autoencoder's names, as in an ae.safetensors or a VAE file of the webui."""
    keys = []
    for side, level in (("encoder", "down"), ("decoder", "up")):
        keys += [f"{side}.conv_in.bias", f"{side}.conv_in.weight", f"{side}.conv_out.bias", f"{side}.conv_out.weight"]
        keys += [f"{side}.{level}.0.block.0.conv1.{p}" for p in ("bias", "weight")]
        keys += [f"{side}.mid.attn_1.{m}.{p}" for m in ("q", "k", "v", "proj_out") for p in ("bias", "weight")]
        keys += [f"{side}.norm_out.bias", f"{side}.norm_out.weight"]
    return keys


def full_flux() -> dict[str, TensorSpec]:
    """A full Flux dev checkpoint as ComfyUI saves one: transformer, CLIP-L, T5-XXL and VAE."""
    specs = flux_specs(full=False)
    full = {UNET + key: spec for key, spec in specs.items()}
    full |= {CLIP_L + key: spec for key, spec in tiny_specs(clip_text_keys()).items()}
    full |= {T5XXL + key: spec for key, spec in tiny_specs(t5_encoder_keys()).items()}
    return full | {"vae." + key: spec for key, spec in tiny_specs(vae_keys()).items()}


def write_diffusers(path: Path, bfl_file: Path) -> Path:
    """The bare BFL transformer in ``bfl_file`` saved under diffusers' names."""
    safetensors.torch.save_file(as_diffusers(load(bfl_file), H), str(path))
    return path


def weighted(a: str, b: str, alpha: float, name: str) -> MergeRequest:
    return MergeRequest(a, b, multiplier=alpha, custom_name=name)


def report_of(request: MergeRequest, host) -> str:
    plan = make_plan(request, host, hash_inputs=False)
    try:
        return plan.report()
    finally:
        plan.close()


def check_weighted(merged, a, b, key: str, alpha: float, b_key: str | None = None) -> None:
    exact = a[key].double() * (1 - alpha) + b[b_key or key].double() * alpha
    assert_within_one_ulp(merged[key], exact, key)


# -- the diffusers map -------------------------------------------------------------------------------


def specs_reader(specs: dict[str, TensorSpec]) -> CheckpointReader:
    """A reader of headers only: what layouts and matching look at."""
    reader = CheckpointReader(Path("specs-only.safetensors"), specs)
    reader.metadata = {}
    return reader


@pytest.mark.parametrize("dims", [FLUX_DIMS, FLUX_TINY_DIMS], ids=["Flux dev sizes", "tiny"])
@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_every_bfl_key_is_made_from_diffusers_names_with_its_shape(dims, guidance):
    bfl = flux_specs(dims, full=False, guidance=guidance)
    meta = {key: torch.empty(spec.shape, device="meta") for key, spec in bfl.items()}
    diffusers = {
        key: TensorSpec(torch.float32, tuple(t.shape)) for key, t in as_diffusers(meta, dims["hidden"]).items()
    }
    sources = bfl_sources(diffusers)
    assert set(sources) == set(bfl)
    reader = specs_reader(diffusers)
    assert {key: joined_spec(reader, key, source).shape for key, source in sources.items()} == {
        key: spec.shape for key, spec in bfl.items()
    }
    used = [stored for source in sources.values() for stored in source.keys]
    assert sorted(used) == sorted(diffusers)  # every diffusers key, each once


def test_the_flux_shapes_here_are_the_real_ones():
    path = SHARED_DATA / "flux_shapes.json"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    real = {k: tuple(shape) for k, (_, shape) in json.loads(path.read_text()).items() if k.startswith(UNET)}
    assert {k: spec.shape for k, spec in flux_specs(FLUX_DIMS).items() if k.startswith(UNET)} == real


def test_a_diffusers_file_is_read_as_its_bfl_original_bit_for_bit(folder):
    bfl_path = make(folder / "bfl.safetensors", flux_specs(full=False), seed=3, dtype=torch.bfloat16)
    diffusers_path = write_diffusers(folder / "diffusers.safetensors", bfl_path)
    make(folder / "a.safetensors", full_flux(), seed=1)
    with open_checkpoint(folder / "a.safetensors") as a, open_checkpoint(diffusers_path) as b:
        matched = match_inputs({"A": a, "B": b}).readers["B"]
        original = load(bfl_path)
        assert set(matched.keys()) == {UNET + key for key in original}
        for key, tensor in original.items():
            assert matched.spec(UNET + key) == TensorSpec(tensor.dtype, tuple(tensor.shape))
            assert torch.equal(matched[UNET + key], tensor), key


class RecordingReader(CheckpointReader):
    """A reader that notes each key read from it."""

    def __init__(self, inner: CheckpointReader):
        self.path, self.metadata, self._inner, self.read = inner.path, inner.metadata, inner, []
        self._specs = {key: inner.spec(key) for key in inner.keys()}

    def __getitem__(self, key: str) -> torch.Tensor:
        self.read.append(key)
        return self._inner[key]


def test_a_joined_key_reads_only_its_own_stored_keys(folder):
    """Memory stays flat: a fused key is made from its own stored keys when it is read, nothing more."""
    bfl_path = make(folder / "bfl.safetensors", flux_specs(full=False), seed=3)
    diffusers_path = write_diffusers(folder / "diffusers.safetensors", bfl_path)
    make(folder / "a.safetensors", full_flux(), seed=1)
    with open_checkpoint(folder / "a.safetensors") as a, open_checkpoint(diffusers_path) as inner:
        recording = RecordingReader(inner)
        matched = match_inputs({"A": a, "B": recording}).readers["B"]
        assert recording.read == []  # matching reads headers only
        assert matched[UNET + "single_blocks.5.linear1.weight"].shape == (7 * H, H)
    parts = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
    assert recording.read == [f"single_transformer_blocks.5.{part}.weight" for part in parts]


def test_keys_that_cannot_be_joined_are_refused_naming_the_file_and_keys(folder):
    specs = {
        "attn.to_q.weight": TensorSpec(torch.float16, (4, 4)),
        "attn.to_k.weight": TensorSpec(torch.float32, (4, 4)),
    }
    path = make(folder / "odd.safetensors", specs, seed=1)
    with open_checkpoint(path) as inner, pytest.raises(InputError) as error:
        MatchedReader(inner, {"qkv.weight": Joined(("attn.to_q.weight", "attn.to_k.weight"))})
    assert "odd.safetensors: keys attn.to_q.weight, attn.to_k.weight cannot be joined into qkv.weight" in str(
        error.value
    )


# -- recognising layouts ------------------------------------------------------------------------------


def test_the_parts_of_full_checkpoints_and_of_files_of_one_part():
    assert detect(full_flux()).describe() == (
        "full checkpoint: Flux transformer at model.diffusion_model., CLIP text encoder at "
        "text_encoders.clip_l.transformer., T5 encoder at text_encoders.t5xxl.transformer., VAE at vae."
    )
    assert detect(SD15).describe() == (
        "full checkpoint: UNet at model.diffusion_model., CLIP text encoder at cond_stage_model.transformer., "
        "VAE at first_stage_model."
    )
    assert detect(flux_specs(full=False)).describe() == "Flux transformer alone (keys without prefix)"
    assert detect(clip_text_keys()).describe() == "CLIP text encoder alone (keys without prefix)"
    assert detect(t5_encoder_keys()).describe() == "T5 encoder alone (keys without prefix)"
    assert detect(vae_keys()).describe() == "VAE alone (keys without prefix)"
    diffusers_vae = ["encoder.conv_in.weight", "encoder.down_blocks.0.resnets.0.conv1.weight"]
    assert detect(diffusers_vae).parts == ()  # diffusers' VAE names are not the LDM ones: not matched
    assert [part.kind for part in detect(full_flux()).parts] == [
        layout_kinds.FLUX,
        layout_kinds.CLIP,
        layout_kinds.T5,
        layout_kinds.VAE,
    ]


def test_a_clip_l_file_is_paired_with_an_sd3_checkpoints_clip_l_not_its_clip_g():
    """Both CLIPs of SD3 have the same key names (CLIP-G has more layers): the shapes tell them apart."""
    wide = {
        key: TensorSpec(spec.dtype, tuple(n + 2 for n in spec.shape))
        for key, spec in tiny_specs(clip_text_keys()).items()
    }
    sd3 = {UNET + key: spec for key, spec in tiny_specs(sd3_keys(full=False)).items()}
    sd3 |= {f"text_encoders.clip_g.transformer.{key}": spec for key, spec in wide.items()}
    sd3 |= {f"{CLIP_L}{key}": spec for key, spec in tiny_specs(clip_text_keys()).items()}
    clip_l = tiny_specs(clip_text_keys())
    matching = match_inputs({"A": specs_reader(sd3), "B": specs_reader(clip_l)})
    assert set(matching.readers["B"].keys()) == {CLIP_L + key for key in clip_l}
    assert "read as A's CLIP text encoder at text_encoders.clip_l.transformer.;" in matching.lines[1]


def test_a_key_that_would_be_read_under_two_names_is_refused():
    spec = TensorSpec(torch.float16, (2, 2))
    a = specs_reader({"double_blocks.0.img_attn.qkv.weight": spec, "img_in.weight": spec})
    b = specs_reader(
        {UNET + "double_blocks.0.img_attn.qkv.weight": spec, UNET + "img_in.weight": spec, "img_in.weight": spec}
    )
    with pytest.raises(
        InputError, match=r"key img_in\.weight is also what model\.diffusion_model\.img_in\.weight is read"
    ):
        match_inputs({"A": a, "B": b})


# -- merges across layouts -----------------------------------------------------------------------------


def test_a_full_checkpoint_and_a_bare_transformer_merge_in_the_full_layout(folder, host):
    make(folder / "a.safetensors", full_flux(), seed=1)
    make(folder / "b.safetensors", flux_specs(full=False), seed=2)
    result = merge(weighted("a.safetensors", "b.safetensors", 0.3, "out"), host)
    merged, a, b = load(result.path), load(folder / "a.safetensors"), load(folder / "b.safetensors")
    assert set(merged) == set(a)
    for key in b:
        check_weighted(merged, a, b, UNET + key, 0.3, b_key=key)
    for key in a:
        if not key.startswith(UNET):  # the text encoders and VAE: B has none, A's are copied
            assert torch.equal(merged[key], a[key]), key


def test_a_diffusers_transformer_merges_as_its_bfl_copy_would(folder, host):
    make(folder / "a.safetensors", full_flux(), seed=1)
    bfl_path = make(folder / "bfl.safetensors", flux_specs(full=False), seed=2)
    write_diffusers(folder / "diffusers.safetensors", bfl_path)
    via_bfl = load(merge(weighted("a.safetensors", "bfl.safetensors", 0.3, "via-bfl"), host).path)
    via_diffusers = load(merge(weighted("a.safetensors", "diffusers.safetensors", 0.3, "via-diffusers"), host).path)
    assert set(via_diffusers) == set(via_bfl) == set(full_flux())
    for key in via_bfl:
        assert torch.equal(via_diffusers[key], via_bfl[key]), key
    # And against the diffusers tensors themselves: the fused q/k/v, linear1's MLP rows, the swapped halves.
    a, d, m = load(folder / "a.safetensors"), load(folder / "diffusers.safetensors"), via_diffusers

    def rows(key, start, stop):
        return {"out": m[key][start:stop], "a": a[key][start:stop]}

    def check(key, start, stop, diffusers_key):
        part = rows(key, start, stop)
        exact = part["a"].double() * 0.7 + d[diffusers_key].double() * 0.3
        assert_within_one_ulp(part["out"], exact, f"{key}[{start}:{stop}]")

    check(UNET + "double_blocks.4.img_attn.qkv.weight", H, 2 * H, "transformer_blocks.4.attn.to_k.weight")
    check(UNET + "double_blocks.4.txt_attn.qkv.bias", 2 * H, 3 * H, "transformer_blocks.4.attn.add_v_proj.bias")
    check(UNET + "single_blocks.9.linear1.weight", 3 * H, 7 * H, "single_transformer_blocks.9.proj_mlp.weight")
    shift_scale = UNET + "final_layer.adaLN_modulation.1.weight"
    scale_shift = d["norm_out.linear.weight"]
    assert_within_one_ulp(m[shift_scale][:H], a[shift_scale][:H].double() * 0.7 + scale_shift[H:].double() * 0.3)
    assert_within_one_ulp(m[shift_scale][H:], a[shift_scale][H:].double() * 0.7 + scale_shift[:H].double() * 0.3)


def test_block_weights_follow_the_primarys_names_through_the_match(folder, host):
    from lib_merge.recipe import MergeNode, ModelRef

    make(folder / "a.safetensors", full_flux(), seed=1)
    bfl_path = make(folder / "bfl.safetensors", flux_specs(full=False), seed=2)
    write_diffusers(folder / "diffusers.safetensors", bfl_path)
    node = MergeNode(
        "weighted_sum",
        (ModelRef("a.safetensors"), ModelRef("diffusers.safetensors")),
        {"alpha": 0.5},
        {"alpha": "BASE=0.5,D*=0,S*=1"},
    )
    merged = load(merge(MergeRequest("a.safetensors", tree=node, custom_name="blocks"), host).path)
    a, b = load(folder / "a.safetensors"), load(bfl_path)
    assert torch.equal(
        merged[UNET + "double_blocks.3.img_attn.qkv.weight"], a[UNET + "double_blocks.3.img_attn.qkv.weight"]
    )
    assert torch.equal(merged[UNET + "single_blocks.3.linear1.weight"], b["single_blocks.3.linear1.weight"])


def test_a_bare_primary_gives_a_bare_output_and_drops_the_others_parts(folder, host):
    make(folder / "a.safetensors", flux_specs(full=False), seed=1)
    make(folder / "b.safetensors", full_flux(), seed=2)
    request = weighted("a.safetensors", "b.safetensors", 0.6, "bare-out")
    report = report_of(request, host)
    assert f"Keys only in B (dropped): {len(full_flux()) - len(flux_specs(full=False))} (" in report
    assert "not in A, dropped: CLIP text encoder at text_encoders.clip_l.transformer., T5 encoder at " in report
    merged, a, b = load(merge(request, host).path), load(folder / "a.safetensors"), load(folder / "b.safetensors")
    assert set(merged) == set(a)
    for key in a:
        check_weighted(merged, a, b, key, 0.6, b_key=UNET + key)


def test_a_clip_l_file_merges_into_a_full_checkpoints_text_encoder_only(folder, host):
    make(folder / "a.safetensors", full_flux(), seed=1)
    make(folder / "clip_l.safetensors", tiny_specs(clip_text_keys()), seed=2)
    request = weighted("a.safetensors", "clip_l.safetensors", 0.25, "new-clip")
    report = report_of(request, host)
    assert (
        "B layout: CLIP text encoder alone (keys without prefix). Matched: CLIP text encoder without prefix read "
        "as A's CLIP text encoder at text_encoders.clip_l.transformer.; not in B, kept from A: Flux transformer at "
        "model.diffusion_model., T5 encoder at text_encoders.t5xxl.transformer., VAE at vae."
    ) in report
    assert "B: clip_l.safetensors: unknown, 36 keys" in report  # a text encoder alone: no family to refuse
    merged, a, b = load(merge(request, host).path), load(folder / "a.safetensors"), load(folder / "clip_l.safetensors")
    assert set(merged) == set(a)
    for key in a:
        if key.startswith(CLIP_L):
            check_weighted(merged, a, b, key, 0.25, b_key=key[len(CLIP_L) :])
        else:
            assert torch.equal(merged[key], a[key]), key


def test_a_full_checkpoints_text_encoder_merges_into_a_clip_l_file(folder, host):
    make(folder / "clip_l.safetensors", tiny_specs(clip_text_keys()), seed=1)
    make(folder / "full.safetensors", full_flux(), seed=2)
    merged = load(merge(weighted("clip_l.safetensors", "full.safetensors", 0.5, "clip-out"), host).path)
    a, b = load(folder / "clip_l.safetensors"), load(folder / "full.safetensors")
    assert set(merged) == set(a)
    for key in a:
        check_weighted(merged, a, b, key, 0.5, b_key=CLIP_L + key)


@pytest.mark.parametrize("keys", [vae_keys(), t5_encoder_keys()], ids=["two VAE files", "two T5 files"])
def test_two_files_of_one_part_merge_every_key(folder, host, keys):
    """No key of a VAE or T5 file has "model" in its name: the built-in's rule would merge none."""
    make(folder / "a.safetensors", tiny_specs(keys), seed=1)
    make(folder / "b.safetensors", tiny_specs(keys), seed=2)
    request = weighted("a.safetensors", "b.safetensors", 0.4, "part")
    assert f"({len(keys)} keys, {len(keys)} merged," in report_of(request, host)
    merged, a, b = load(merge(request, host).path), load(folder / "a.safetensors"), load(folder / "b.safetensors")
    for key in keys:
        check_weighted(merged, a, b, key, 0.4)


def test_the_preflight_says_how_each_layout_was_matched(folder, host):
    make(folder / "a.safetensors", full_flux(), seed=1)
    bfl_path = make(folder / "bfl.safetensors", flux_specs(full=False), seed=2)
    write_diffusers(folder / "diffusers.safetensors", bfl_path)
    lines = report_of(weighted("a.safetensors", "diffusers.safetensors", 0.5, "o"), host).splitlines()
    assert lines[1].startswith(f"A: a.safetensors: Flux dev, {len(full_flux())} keys")
    assert lines[2].startswith("B: diffusers.safetensors: Flux dev, 780 keys")  # as read: BFL's keys
    assert lines[3:5] == [
        "A layout: full checkpoint: Flux transformer at model.diffusion_model., CLIP text encoder at "
        "text_encoders.clip_l.transformer., T5 encoder at text_encoders.t5xxl.transformer., VAE at vae.",
        "B layout: diffusers Flux transformer alone (keys without prefix). Matched: diffusers Flux transformer "
        "without prefix read as A's Flux transformer at model.diffusion_model. (diffusers names as BFL's: q, k, v "
        "joined into qkv, and with the MLP into linear1; final modulation halves swapped); not in B, kept from A: "
        "CLIP text encoder at text_encoders.clip_l.transformer., T5 encoder at text_encoders.t5xxl.transformer., "
        "VAE at vae.",
    ]
    assert lines[5].startswith(f"Keys only in A (copied): {len(full_flux()) - 780} (")
    assert lines[6] == "Keys only in B (dropped): none"
    assert lines[-1] == "Ready to merge."


def test_inputs_in_one_layout_get_no_layout_lines(folder, host):
    make(folder / "a.safetensors", full_flux(), seed=1)
    make(folder / "b.safetensors", full_flux(), seed=2)
    lines = report_of(weighted("a.safetensors", "b.safetensors", 0.5, "o"), host).splitlines()
    assert not [line for line in lines if " layout: " in line]


# -- what stays refused -----------------------------------------------------------------------------


def test_a_diffusers_primary_with_a_bfl_secondary_is_refused_saying_which_to_put_first(folder, host):
    bfl_path = make(folder / "bfl.safetensors", flux_specs(full=False), seed=2)
    write_diffusers(folder / "diffusers.safetensors", bfl_path)
    make(folder / "full.safetensors", full_flux(), seed=1)
    request = weighted("diffusers.safetensors", "full.safetensors", 0.5, "refused")
    with pytest.raises(IncompatibleModelsError) as error:
        merge(request, host)
    assert str(error.value) == (
        "A is a diffusers-named Flux transformer and B (full.safetensors) has BFL names (Flux transformer at "
        "model.diffusion_model.): Merge Lab reads diffusers names as BFL names, not the other way round; put "
        "full.safetensors first (as the primary model), and the output will have BFL names"
    )
    assert not (folder / "refused.safetensors").exists()
    # Two diffusers-named files are one layout: merged by name, every key, as Flux dev.
    write_diffusers(
        folder / "diffusers2.safetensors", make(folder / "bfl2.safetensors", flux_specs(full=False), seed=4)
    )
    both = weighted("diffusers.safetensors", "diffusers2.safetensors", 0.5, "both")
    assert "A: diffusers.safetensors: Flux dev" in report_of(both, host)
    merged = load(merge(both, host).path)
    a, b = load(folder / "diffusers.safetensors"), load(folder / "diffusers2.safetensors")
    assert set(merged) == set(a)
    for key in a:
        check_weighted(merged, a, b, key, 0.5)


def sd15_clip_as_flux_text_encoder() -> dict[str, TensorSpec]:
    """A full Flux file whose CLIP-L has the shapes of the SD1.5 test model's: the two CLIP parts match."""
    prefix = "cond_stage_model.transformer."
    clip = {CLIP_L + k[len(prefix) :]: s for k, s in SD15.items() if k.startswith(prefix + "text_model.")}
    return {**{k: s for k, s in full_flux().items() if not k.startswith(CLIP_L)}, **clip}


@pytest.mark.parametrize(
    ("b_specs", "families"),
    [
        (SD15, "A is Flux dev (a.safetensors: guidance_in.* keys), B is SD1 (b.safetensors)"),
        (
            "diffusers schnell",
            "A is Flux dev (a.safetensors: guidance_in.* keys), B is Flux schnell (b.safetensors: no guidance_in.* keys)",
        ),
    ],
    ids=["SD1.5 whose CLIP matches A's", "a diffusers-named schnell"],
)
def test_other_families_are_still_refused_though_a_part_matches(folder, host, b_specs, families):
    make(folder / "a.safetensors", sd15_clip_as_flux_text_encoder(), seed=1)
    if b_specs == "diffusers schnell":
        bfl = make(folder / "schnell.safetensors", flux_specs(full=False, guidance=False), seed=2)
        write_diffusers(folder / "b.safetensors", bfl)
    else:
        make(folder / "b.safetensors", b_specs, seed=2)
    request = weighted("a.safetensors", "b.safetensors", 0.5, "refused")
    with pytest.raises(IncompatibleModelsError, match="different architectures") as error:
        merge(request, host)
    assert families in str(error.value)
    assert not (folder / "refused.safetensors").exists()


# -- the command line ---------------------------------------------------------------------------------


def test_the_command_line_merges_a_full_checkpoint_with_a_diffusers_transformer(folder, tmp_path):
    make(folder / "a.safetensors", full_flux(), seed=1)
    bfl_path = make(folder / "bfl.safetensors", flux_specs(full=False), seed=2)
    write_diffusers(folder / "diffusers.safetensors", bfl_path)
    out = tmp_path / "merged.safetensors"
    dry = cli(
        "merge", folder / "a.safetensors", folder / "diffusers.safetensors", "--alpha", "0.5", "-o", out, "--dry-run"
    )
    assert dry.returncode == 0, dry.stderr
    assert "B layout: diffusers Flux transformer alone (keys without prefix). Matched:" in dry.stdout
    done = cli("merge", folder / "a.safetensors", folder / "diffusers.safetensors", "--alpha", "0.5", "-o", out)
    assert done.returncode == 0, done.stderr
    merged, a, b = load(out), load(folder / "a.safetensors"), load(bfl_path)
    assert set(merged) == set(a)
    check_weighted(
        merged, a, b, UNET + "double_blocks.0.img_attn.qkv.weight", 0.5, "double_blocks.0.img_attn.qkv.weight"
    )
    check_weighted(merged, a, b, UNET + "single_blocks.37.linear1.bias", 0.5, "single_blocks.37.linear1.bias")
