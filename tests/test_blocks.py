"""Per-block parameters: block_of against the full SD1.5 / SDXL / Flux / SD3 key tables, parsing, presets."""

from __future__ import annotations

import copy
import json
import math
import pickle
from collections import Counter
from importlib import resources
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from transformer_layouts import (
    FLUX_DOUBLE_BLOCKS,
    FLUX_SINGLE_BLOCKS,
    FLUX_TEXT_ENCODER_KEYS,
    FLUX_VAE_KEYS,
    SD3_TEXT_ENCODER_KEYS,
    SD3_VAE_KEYS,
    SD35_MEDIUM_ATTN2_BLOCKS,
    flux_keys,
    sd3_keys,
)

from lib_merge.arch import (
    FLUX,
    FLUX_SCHNELL,
    SD1,
    SD2,
    SD3,
    SD3_MEDIUM,
    SD35_LARGE,
    SD35_MEDIUM,
    SDXL,
    SDXL_REFINER,
    UNKNOWN,
    family_of,
)
from lib_merge.blocks import (
    BlockValues,
    block_names,
    block_note,
    block_of,
    parse_blocks,
    preset_values,
    presets,
)
from lib_merge.errors import RequestError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
UNET = "model.diffusion_model."

# Keys per UNet part, from the LDM module definitions (not from blocks.py):
CONV = 2  # a conv's weight + bias (conv_in, a downsampler's op, an upsampler's conv)
EMBED = 4  # time_embed / label_emb: two linears
RES = 10  # ResBlock: in_layers norm+conv, emb_layers linear, out_layers norm+conv
RES_SKIP = 12  # ... plus a 1x1 skip_connection when the channel count changes
OUT = 4  # the final norm + conv after the last output block


def attn(depth: int) -> int:
    """SpatialTransformer keys: norm, proj_in, proj_out + per block attn1 (5), attn2 (5), ff (4), 3 norms (6)."""
    return 6 + 20 * depth


# SD1.5: channel_mult 1,2,4,4, attention at the first three levels, transformer depth 1.
SD1_COUNTS = {
    "IN00": CONV + EMBED,
    "IN01": RES + attn(1),
    "IN02": RES + attn(1),
    "IN03": CONV,
    "IN04": RES_SKIP + attn(1),
    "IN05": RES + attn(1),
    "IN06": CONV,
    "IN07": RES_SKIP + attn(1),
    "IN08": RES + attn(1),
    "IN09": CONV,
    "IN10": RES,
    "IN11": RES,
    "M00": RES + attn(1) + RES,
    "OUT00": RES_SKIP,
    "OUT01": RES_SKIP,
    "OUT02": RES_SKIP + CONV,
    "OUT03": RES_SKIP + attn(1),
    "OUT04": RES_SKIP + attn(1),
    "OUT05": RES_SKIP + attn(1) + CONV,
    "OUT06": RES_SKIP + attn(1),
    "OUT07": RES_SKIP + attn(1),
    "OUT08": RES_SKIP + attn(1) + CONV,
    "OUT09": RES_SKIP + attn(1),
    "OUT10": RES_SKIP + attn(1),
    "OUT11": RES_SKIP + attn(1) + OUT,
}

# SDXL: channel_mult 1,2,4, transformer depth 0, 2, 10 per level, label_emb for the size/crop vector.
SDXL_COUNTS = {
    "IN00": CONV + EMBED + EMBED,
    "IN01": RES,
    "IN02": RES,
    "IN03": CONV,
    "IN04": RES_SKIP + attn(2),
    "IN05": RES + attn(2),
    "IN06": CONV,
    "IN07": RES_SKIP + attn(10),
    "IN08": RES + attn(10),
    "M00": RES + attn(10) + RES,
    "OUT00": RES_SKIP + attn(10),
    "OUT01": RES_SKIP + attn(10),
    "OUT02": RES_SKIP + attn(10) + CONV,
    "OUT03": RES_SKIP + attn(2),
    "OUT04": RES_SKIP + attn(2),
    "OUT05": RES_SKIP + attn(2) + CONV,
    "OUT06": RES_SKIP,
    "OUT07": RES_SKIP,
    "OUT08": RES_SKIP + OUT,
}

# Published UNet sizes: SD1.5 859,520,964 and SDXL base 2,567,463,684 parameters.
TABLES = {
    SD1: ("sd15", SD1_COUNTS, 859_520_964, "cond_stage_model."),
    SDXL: ("sdxl", SDXL_COUNTS, 2_567_463_684, "conditioner."),
}


def table(name: str) -> dict[str, list]:
    """A package key table: key -> [dtype, shape]."""
    return json.loads(resources.files("lib_merge").joinpath(f"data/{name}_shapes.json").read_text())


def shared_table(name: str) -> dict[str, list]:
    path = SHARED_DATA / f"{name}_shapes.json"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return json.loads(path.read_text())


@pytest.fixture(params=[SD1, SDXL])
def family(request) -> str:
    return request.param


def blocks_of_table(family: str) -> dict[str, str]:
    return {key: block_of(key, family) for key in table(TABLES[family][0])}


# -- block_of against the full key tables ----------------------------------------------------------


def test_the_tables_are_the_families_they_claim(family):
    assert family_of(table(TABLES[family][0])) == family


def test_every_unet_key_lands_in_a_unet_block(family):
    unet_blocks = set(block_names(family)) - {"BASE"}
    for key, block in blocks_of_table(family).items():
        if key.startswith(UNET):
            assert block in unet_blocks, key


def test_vae_keys_are_vae_and_the_rest_base(family):
    text_encoder = TABLES[family][3]
    for key, block in blocks_of_table(family).items():
        if key.startswith("first_stage_model."):
            assert block == "VAE", key
        elif not key.startswith(UNET):
            assert block == "BASE", key
        if key.startswith(text_encoder):
            assert block == "BASE", key


def test_the_blocks_used_are_exactly_the_familys_names(family):
    used = set(blocks_of_table(family).values())
    assert used == {*block_names(family), "VAE"}


def test_keys_per_block_match_the_architecture(family):
    counts = Counter(block for key, block in blocks_of_table(family).items() if key.startswith(UNET))
    assert dict(counts) == TABLES[family][1]


def test_parameters_per_block_sum_to_the_published_unet_size(family):
    name, _, unet_size, _ = TABLES[family]
    sizes = Counter()
    for key, (_, shape) in table(name).items():
        block = block_of(key, family)
        if block not in ("BASE", "VAE"):
            sizes[block] += math.prod(shape)
    assert sum(sizes.values()) == unet_size
    assert all(size > 0 for size in sizes.values())


def test_sd1_attention_blocks_are_bigger_than_downsamplers():
    counts = Counter(block_of(key, SD1) for key in table("sd15") if key.startswith(UNET))
    attention = [counts[f"IN{i:02d}"] for i in (1, 2, 4, 5, 7, 8)]
    downsamplers = [counts[f"IN{i:02d}"] for i in (3, 6, 9)]
    assert min(attention) > max(downsamplers)
    assert downsamplers == [2, 2, 2]


def test_middle_block_is_resnet_attention_resnet(family):
    parts = {
        key.removeprefix(UNET + "middle_block.").split(".")[0]
        for key, block in blocks_of_table(family).items()
        if block == "M00"
    }
    assert parts == {"0", "1", "2"}
    middle = [key for key, block in blocks_of_table(family).items() if block == "M00"]
    assert any(".1.transformer_blocks." in key for key in middle)
    assert all(key.startswith(UNET + "middle_block.") for key in middle)


def test_embeddings_go_first_and_the_final_layers_last(family):
    last = block_names(family)[-1]
    for key, block in blocks_of_table(family).items():
        if key.startswith((UNET + "time_embed.", UNET + "label_emb.")):
            assert block == "IN00", key
        if key.startswith(UNET + "out."):
            assert block == last, key
    assert last == ("OUT11" if family == SD1 else "OUT08")


def test_out_uses_the_familys_last_block_and_sd1_numbering_by_default():
    key = UNET + "out.2.weight"
    assert block_of(key) == "OUT11"
    assert [block_of(key, f) for f in (SD1, SD2, SDXL, SDXL_REFINER)] == ["OUT11", "OUT11", "OUT08", "OUT11"]


def test_refiner_has_the_sd1_layout():
    assert block_names(SDXL_REFINER) == block_names(SD1)
    assert block_of(UNET + "label_emb.0.0.weight", SDXL_REFINER) == "IN00"


@pytest.mark.parametrize(
    ("key", "block"),
    [
        (UNET + "input_blocks.10.0.in_layers.0.bias", "IN10"),
        (UNET + "output_blocks.1.0.skip_connection.weight", "OUT01"),
        ("model_ema.diffusion_modelinput_blocks10in_layers0bias", "BASE"),
        ("xmodel.diffusion_model.input_blocks.1.0.in_layers.0.bias", "BASE"),
        ("cond_stage_model.model.transformer.resblocks.0.attn.out_proj.weight", "BASE"),
        ("first_stage_model.decoder.mid.block_1.conv1.weight", "VAE"),
        (UNET + "outer.weight", "BASE"),
        ("first_stage_model_extra.weight", "BASE"),
        ("alphas_cumprod", "BASE"),
    ],
)
def test_prefixes_are_anchored(key, block):
    assert block_of(key, SD1) == block


def test_no_note_for_families_with_a_block_map():
    mapped = (SD1, SD2, SDXL, SDXL_REFINER, FLUX, FLUX_SCHNELL, SD3_MEDIUM, SD35_MEDIUM, SD35_LARGE)
    assert [block_note(f) for f in mapped] == [None] * len(mapped)
    note = block_note(SD3)
    assert note is not None and "SD3" in note and "BASE" in note and "24 or 38" in note


# -- SD2: the SD1 UNet numbering, an OpenCLIP text encoder ----------------------------------------

SD2_TEXT_ENCODER = (
    "cond_stage_model.model.positional_embedding",
    "cond_stage_model.model.token_embedding.weight",
    "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
    "cond_stage_model.model.transformer.resblocks.22.mlp.c_proj.bias",
    "cond_stage_model.model.ln_final.weight",
)


def sd2_keys() -> list[str]:
    """SD2's keys: SD1.5's UNet and VAE (the same key names) with SD2's OpenCLIP text encoder."""
    return [k for k in table("sd15") if not k.startswith("cond_stage_model.")] + list(SD2_TEXT_ENCODER)


def test_sd2_has_the_sd1_blocks_and_its_text_encoder_is_base():
    keys = sd2_keys()
    assert family_of(keys) == SD2
    assert block_names(SD2) == block_names(SD1)
    for key in keys:
        expected = "BASE" if key.startswith("cond_stage_model.") else block_of(key, SD1)
        assert block_of(key, SD2) == expected, key
    assert {block_of(key, SD2) for key in keys} == {*block_names(SD2), "VAE"}
    assert [block_of(key, SD2) for key in SD2_TEXT_ENCODER] == ["BASE"] * len(SD2_TEXT_ENCODER)


# -- Flux and SD3: transformer blocks -------------------------------------------------------------

FLUX_NAMES = ("BASE", *(f"D{i:02d}" for i in range(19)), *(f"S{i:02d}" for i in range(38)))


def expected_transformer_block(key: str) -> str:
    """The block of a Flux / SD3 key written out from its name, independent of blocks.py."""
    bare = key.removeprefix(UNET)
    if key.startswith(("vae.", "first_stage_model.")):
        return "VAE"
    for part, letter in (("double_blocks", "D"), ("single_blocks", "S"), ("joint_blocks", "J")):
        if bare.startswith(part + ".") and not key.startswith("text_encoders."):
            return f"{letter}{int(bare.split('.')[1]):02d}"
    return "BASE"


TRANSFORMER_TABLES = {
    "flux dev full": (FLUX, flux_keys()),
    "flux dev bare": (FLUX, flux_keys(full=False)),
    "flux schnell full": (FLUX_SCHNELL, flux_keys(guidance=False)),
    "flux schnell bare": (FLUX_SCHNELL, flux_keys(full=False, guidance=False)),
    "sd3 medium full": (SD3_MEDIUM, sd3_keys(24)),
    "sd3 medium bare": (SD3_MEDIUM, sd3_keys(24, full=False)),
    "sd3.5 medium": (SD35_MEDIUM, sd3_keys(24, attn2_blocks=SD35_MEDIUM_ATTN2_BLOCKS)),
    "sd3.5 large full": (SD35_LARGE, sd3_keys(38)),
    "sd3.5 large bare": (SD35_LARGE, sd3_keys(38, full=False)),
}


@pytest.mark.parametrize("name", TRANSFORMER_TABLES)
def test_transformer_keys_land_in_their_blocks(name):
    family, keys = TRANSFORMER_TABLES[name]
    assert family_of(keys) == family
    for key in keys:
        assert block_of(key, family) == expected_transformer_block(key), key
    used = {block_of(key, family) for key in keys}
    full = any(key.startswith(UNET) for key in keys)
    assert used == set(block_names(family)) | ({"VAE"} if full else set())


@pytest.mark.parametrize(
    ("key", "block"),
    [
        (UNET + "double_blocks.0.img_attn.qkv.weight", "D00"),
        ("double_blocks.18.txt_mlp.2.bias", "D18"),
        (UNET + "single_blocks.0.linear1.weight", "S00"),
        ("single_blocks.37.modulation.lin.weight", "S37"),
        (UNET + "img_in.weight", "BASE"),
        ("txt_in.bias", "BASE"),
        (UNET + "time_in.in_layer.weight", "BASE"),
        (UNET + "vector_in.out_layer.bias", "BASE"),
        ("guidance_in.in_layer.weight", "BASE"),
        (UNET + "final_layer.linear.weight", "BASE"),
        ("text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight", "BASE"),
        ("text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight", "BASE"),
        ("vae.decoder.conv_in.weight", "VAE"),
        ("xdouble_blocks.0.img_in.weight", "BASE"),
        (UNET + "double_blocksX.0.weight", "BASE"),
    ],
)
def test_flux_sample_keys(key, block):
    assert block_of(key, FLUX) == block_of(key, FLUX_SCHNELL) == block


@pytest.mark.parametrize(
    ("key", "medium", "large"),
    [
        (UNET + "joint_blocks.0.x_block.attn.qkv.weight", "J00", "J00"),
        ("joint_blocks.23.context_block.adaLN_modulation.1.bias", "J23", "J23"),
        (UNET + "joint_blocks.37.x_block.mlp.fc2.weight", "J37", "J37"),
        (UNET + "x_embedder.proj.weight", "BASE", "BASE"),
        (UNET + "pos_embed", "BASE", "BASE"),
        (UNET + "final_layer.linear.bias", "BASE", "BASE"),
        ("model.model_sampling.sigmas", "BASE", "BASE"),
        ("text_encoders.clip_g.transformer.text_model.final_layer_norm.weight", "BASE", "BASE"),
        ("first_stage_model.decoder.conv_in.weight", "VAE", "VAE"),
    ],
)
def test_sd3_sample_keys(key, medium, large):
    assert block_of(key, SD3_MEDIUM) == block_of(key, SD35_MEDIUM) == medium
    assert block_of(key, SD35_LARGE) == large


def test_transformer_block_names_in_list_order():
    assert block_names(FLUX) == block_names(FLUX_SCHNELL) == FLUX_NAMES
    assert len(block_names(FLUX)) == 1 + FLUX_DOUBLE_BLOCKS + FLUX_SINGLE_BLOCKS == 58
    assert block_names(SD3_MEDIUM) == block_names(SD35_MEDIUM) == ("BASE", *(f"J{i:02d}" for i in range(24)))
    assert block_names(SD35_LARGE) == ("BASE", *(f"J{i:02d}" for i in range(38)))
    assert block_names(SD3) == ("BASE",)


def test_text_encoders_and_vae_of_transformers():
    assert {block_of(key, FLUX) for key in FLUX_TEXT_ENCODER_KEYS} == {"BASE"}
    assert {block_of(key, FLUX) for key in FLUX_VAE_KEYS} == {"VAE"}
    assert {block_of(key, SD35_LARGE) for key in SD3_TEXT_ENCODER_KEYS} == {"BASE"}
    assert {block_of(key, SD35_LARGE) for key in SD3_VAE_KEYS} == {"VAE"}


@pytest.mark.parametrize(
    ("table_name", "family", "keys_per_block"),
    [("flux", FLUX, {"D": 24, "S": 8}), ("sd3", SD3_MEDIUM, {"J": 20})],
)
def test_the_real_transformer_tables(table_name, family, keys_per_block):
    """Against ../shared/data: the generated tables are the real layouts, and every real key lands
    where its name says, with the module's number of keys in each block."""
    real = shared_table(table_name)
    assert family_of(real) == family
    generated = flux_keys() if family == FLUX else sd3_keys(24)
    assert {k for k in real if k.startswith(UNET)} == {k for k in generated if k.startswith(UNET)}
    for key in real:
        assert block_of(key, family) == expected_transformer_block(key), key
    counts = Counter(block_of(key, family) for key in real)
    for block in block_names(family)[1:]:
        expected = keys_per_block[block[0]]
        if block == "J23":  # the last joint block's context stream is pre-only: no proj, no MLP
            expected = 14
        assert counts[block] == expected, block
    assert counts["VAE"] == sum(key.startswith(("vae.", "first_stage_model.")) for key in real)


def test_transformer_globs_and_names():
    values = parse_blocks("D*=0.2,S*=0.7,S37=1,BASE=0", FLUX, param="alpha", default=0.5)
    listed = dict(zip(FLUX_NAMES, values.as_list(), strict=True))
    assert listed["BASE"] == 0.0 and listed["D00"] == listed["D18"] == 0.2
    assert listed["S00"] == listed["S36"] == 0.7 and listed["S37"] == 1.0
    assert values.value("VAE") == 0.5
    assert parse_blocks(values.to_text(), FLUX, param="alpha", default=0.5) == values
    assert parse_blocks("d04=0.3", FLUX_SCHNELL, param="alpha", default=0.5).value("D04") == 0.3
    joint = parse_blocks("J*=0.4,J1[0-9]=0.9", SD35_LARGE, param="alpha", default=0.5)
    assert [joint.value(f"J{i:02d}") for i in (0, 9, 10, 19, 37)] == [0.4, 0.4, 0.9, 0.9, 0.4]
    assert joint.value("BASE") == 0.5
    medium = parse_blocks("ramp_in_out,J23=0,VAE=0.1", SD3_MEDIUM, param="alpha", default=0.5)
    assert medium.as_list() == [*preset_values("ramp_in_out", SD3_MEDIUM)[:-1], 0.0]
    assert medium.value("VAE") == 0.1


@pytest.mark.parametrize(
    ("family", "pattern", "listing"),
    [
        (FLUX, "IN*", "D00-D18, S00-S37, BASE, VAE"),
        (FLUX, "D19", "D00-D18, S00-S37, BASE, VAE"),
        (SD3_MEDIUM, "J24", "J00-J23, BASE, VAE"),
        (SD35_LARGE, "S*", "J00-J37, BASE, VAE"),
        (SD1, "D*", "IN00-IN11, M00, OUT00-OUT11, BASE, VAE"),
    ],
)
def test_a_block_of_another_family_is_an_error(family, pattern, listing):
    with pytest.raises(RequestError) as error:
        parse_blocks(f"{pattern}=0.3", family, param="alpha", default=0.5)
    assert str(error.value) == f"blocks.alpha: '{pattern}' matches no {family} block ({listing})"


@pytest.mark.parametrize(("family", "count"), [(FLUX, 58), (SD3_MEDIUM, 25), (SD35_LARGE, 39)])
@pytest.mark.parametrize("given_count", [26, 20])
def test_an_sd_list_is_refused_for_a_transformer(family, count, given_count):
    message = rf"^blocks\.alpha: expected {count} values for {family} \(BASE \+ {count - 1} blocks\), got {given_count}"
    with pytest.raises(RequestError, match=message):
        parse_blocks(",".join(["0.5"] * given_count), family, param="alpha", default=0.5)


def test_a_full_transformer_list_round_trips():
    numbers = [round(i / 57, 6) for i in range(58)]
    values = parse_blocks(",".join(map(str, numbers)), FLUX, param="alpha", default=0.5)
    assert values.as_list() == numbers and values.value("S37") == 1.0
    assert parse_blocks(values.to_text(), FLUX, param="alpha", default=0.5) == values


def test_unknown_family_is_refused():
    with pytest.raises(RequestError, match="unknown"):
        block_names(UNKNOWN)
    with pytest.raises(RequestError, match=r"^blocks\.alpha: .*unknown"):
        parse_blocks("1", UNKNOWN, param="alpha", default=0.5)


# -- block names and the comma list ---------------------------------------------------------------


def test_block_names_in_list_order():
    sd1 = block_names(SD1)
    assert len(sd1) == 26 and sd1[:3] == ("BASE", "IN00", "IN01") and sd1[12:15] == ("IN11", "M00", "OUT00")
    sdxl = block_names(SDXL)
    assert len(sdxl) == 20 and sdxl[9:12] == ("IN08", "M00", "OUT00") and sdxl[-1] == "OUT08"
    assert block_names(SD2) == sd1
    assert "VAE" not in sd1 + sdxl


def test_a_list_round_trips(family):
    names = block_names(family)
    numbers = [round(i / 7 - 1, 6) for i in range(len(names))]
    text = " , ".join(str(n) for n in numbers)
    values = parse_blocks(text, family, param="alpha", default=0.5)
    assert values.as_list() == numbers
    assert [values.value(name) for name in names] == numbers
    again = parse_blocks(values.to_text(), family, param="alpha", default=0.5)
    assert again == values and again.to_text() == values.to_text()


@pytest.mark.parametrize(("family", "count", "blocks"), [(SD1, 26, 25), (SDXL, 20, 19)])
@pytest.mark.parametrize("given_count", [1, 24, 25, 27])
def test_wrong_length_names_the_param_and_the_count(family, count, blocks, given_count):
    text = ",".join(["0.5"] * given_count)
    message = rf"^blocks\.beta: expected {count} values for {family} \(BASE \+ {blocks} blocks\), got {given_count}"
    with pytest.raises(RequestError, match=message):
        parse_blocks(text, family, param="beta", default=0.5)


def test_one_value_short_says_base_comes_first():
    with pytest.raises(RequestError, match="first value is BASE"):
        parse_blocks(",".join(["1"] * 25), SD1, param="alpha", default=0.5)


@pytest.mark.parametrize("text", ["1,x," + ",".join(["1"] * 24), "IN04=x", "IN04=", "IN04=1e999"])
def test_non_numbers_are_refused(text):
    with pytest.raises(RequestError, match=r"^blocks\.alpha: '.*' is not a (finite )?number$"):
        parse_blocks(text, SD1, param="alpha", default=0.5)


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused(bad):
    with pytest.raises(RequestError, match="finite"):
        parse_blocks(",".join([bad, *["1"] * 25]), SD1, param="alpha", default=0.5)
    with pytest.raises(RequestError, match="finite"):
        parse_blocks(f"M00={bad}", SD1, param="alpha", default=0.5)
    with pytest.raises(RequestError, match="finite"):
        parse_blocks("M00=1", SD1, param="alpha", default=float(bad))


def test_empty_items_are_refused():
    with pytest.raises(RequestError, match=r"^blocks\.alpha: empty item"):
        parse_blocks("IN04=1,,OUT*=0", SD1, param="alpha", default=0.5)


def test_blank_text_means_no_block_values(family):
    values = parse_blocks("  ", family, param="alpha", default=0.25)
    assert values.values == {} and set(values.as_list()) == {0.25}
    assert values.to_text() == ""
    assert parse_blocks("", family, param="alpha", default=0.25) == values


# -- named overrides ------------------------------------------------------------------------------


def expected_overrides(family: str, default: float) -> dict[str, float]:
    """IN04=0.3, OUT*=0.7, BASE=1 written out by hand."""
    return {
        name: 1.0 if name == "BASE" else 0.3 if name == "IN04" else 0.7 if name.startswith("OUT") else default
        for name in block_names(family)
    }


def test_named_overrides_with_globs(family):
    values = parse_blocks("IN04=0.3, OUT*=0.7 ,BASE=1", family, param="alpha", default=0.5)
    assert dict(zip(block_names(family), values.as_list(), strict=True)) == expected_overrides(family, 0.5)
    assert parse_blocks(values.to_text(), family, param="alpha", default=0.5) == values
    assert parse_blocks("in04=0.3,out*=0.7,base=1", family, param="alpha", default=0.5) == values


def test_overrides_apply_left_to_right():
    later = parse_blocks("OUT*=0.7,OUT05=0.1", SD1, param="alpha", default=0.5)
    earlier = parse_blocks("OUT05=0.1,OUT*=0.7", SD1, param="alpha", default=0.5)
    assert (later.value("OUT05"), later.value("OUT06")) == (0.1, 0.7)
    assert (earlier.value("OUT05"), earlier.value("OUT06")) == (0.7, 0.7)


def test_character_classes_and_star():
    values = parse_blocks("IN0[0-3]=0.2", SD1, param="alpha", default=0.5)
    assert [values.value(f"IN{i:02d}") for i in range(6)] == [0.2] * 4 + [0.5] * 2
    everything = parse_blocks("*=0.9", SDXL, param="alpha", default=0.5)
    assert set(everything.as_list()) == {0.9} and everything.value("VAE") == 0.9


def test_vae_uses_the_default_unless_given():
    vae_key = "first_stage_model.decoder.conv_in.weight"
    listed = parse_blocks(",".join(["0.9"] * 26), SD1, param="alpha", default=0.5)
    assert listed.value_for(vae_key) == 0.5
    assert parse_blocks("VAE=0.1", SD1, param="alpha", default=0.5).value_for(vae_key) == 0.1


def test_value_for_uses_the_familys_own_out_block():
    values = parse_blocks("OUT08=0.9,OUT11=0.1", SD1, param="alpha", default=0.5)
    assert values.value_for(UNET + "out.0.weight") == 0.1
    xl = parse_blocks("OUT08=0.9", SDXL, param="alpha", default=0.5)
    assert xl.value_for(UNET + "out.0.weight") == 0.9
    assert xl.value_for(UNET + "output_blocks.8.0.emb_layers.1.weight") == 0.9
    assert xl.value_for("conditioner.embedders.0.transformer.text_model.final_layer_norm.weight") == 0.5


@pytest.mark.parametrize(
    ("family", "pattern", "listing"),
    [
        (SD1, "IN13", "IN00-IN11, M00, OUT00-OUT11, BASE, VAE"),
        (SDXL, "IN09", "IN00-IN08, M00, OUT00-OUT08, BASE, VAE"),
        (SDXL, "MID*", "IN00-IN08, M00, OUT00-OUT08, BASE, VAE"),
    ],
)
def test_a_pattern_matching_no_block_is_an_error(family, pattern, listing):
    with pytest.raises(RequestError) as error:
        parse_blocks(f"M00=1,{pattern}=0.3", family, param="alpha", default=0.5)
    assert str(error.value) == f"blocks.alpha: '{pattern}' matches no {family} block ({listing})"


@pytest.mark.parametrize("text", ["IN04", "IN04=1,OUT", "=1"])
def test_items_that_are_not_block_value_pairs(text):
    with pytest.raises(RequestError, match=r"^blocks\.alpha: "):
        parse_blocks(text, SD1, param="alpha", default=0.5)


def test_a_list_and_overrides_do_not_mix():
    with pytest.raises(RequestError, match="not both"):
        parse_blocks("0.5,IN04=1", SD1, param="alpha", default=0.5)


def test_an_sd3_of_unknown_size_takes_one_base_value_and_explains():
    keys = sd3_keys(joint_blocks=12)
    assert family_of(keys) == SD3
    values = parse_blocks("0.8", SD3, param="alpha", default=0.5)
    assert values.as_list() == [0.8]
    assert values.value_for("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight") == 0.8
    assert values.value_for("first_stage_model.decoder.conv_in.weight") == 0.8
    assert parse_blocks(values.to_text(), SD3, param="alpha", default=0.5) == values
    with pytest.raises(RequestError, match="SD3 with a joint-block count other than 24 or 38 has no block map"):
        parse_blocks("J*=1", SD3, param="alpha", default=0.5)
    with pytest.raises(RequestError, match="expected 1 value for SD3"):
        parse_blocks(",".join(["1"] * 25), SD3, param="alpha", default=0.5)


block_subsets = st.sampled_from([SD1, SDXL]).flatmap(
    lambda family: st.tuples(
        st.just(family),
        st.dictionaries(
            st.sampled_from([*block_names(family), "VAE"]),
            st.floats(allow_nan=False, allow_infinity=False),
        ),
        st.floats(allow_nan=False, allow_infinity=False),
    )
)


@given(block_subsets)
def test_to_text_round_trips(case):
    family, given_values, default = case
    values = BlockValues(family, default, given_values)
    again = parse_blocks(values.to_text(), family, param="alpha", default=default)
    assert again == values
    assert [str(v) for v in again.values.values()] == [str(v) for v in values.values.values()]  # -0.0 too


def test_block_values_pickle_and_copy():
    values = parse_blocks("ramp_in_out,M00=0", SDXL, param="alpha", default=0.5)
    assert pickle.loads(pickle.dumps(values)) == values == copy.deepcopy(values)
    with pytest.raises(ValueError):
        BlockValues(SDXL, 0.5, {"IN11": 1.0})


# -- presets --------------------------------------------------------------------------------------


LIST_LENGTHS = {
    SD1: 26,
    SD2: 26,
    SDXL_REFINER: 26,
    SDXL: 20,
    FLUX: 1 + 19 + 38,
    FLUX_SCHNELL: 1 + 19 + 38,
    SD3_MEDIUM: 1 + 24,
    SD35_MEDIUM: 1 + 24,
    SD35_LARGE: 1 + 38,
    SD3: 1,
}


def unet_part(values: list[float]) -> list[float]:
    return values[1:]


@pytest.mark.parametrize("name", sorted(presets()))
def test_every_preset_fits_every_family(name):
    for family, length in LIST_LENGTHS.items():
        values = preset_values(name, family)
        assert len(values) == length == len(block_names(family))
        assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in values)
        parsed = parse_blocks(name.upper(), family, param="alpha", default=0.5)
        assert parsed.as_list() == values
    assert "BASE" in presets()[name]["about"]


def test_the_required_presets_exist():
    assert {"flat", "ramp_in_out", "ramp_out_in", "in_heavy", "out_heavy", "middle_heavy"} <= set(presets())


def test_flat_is_all_ones(family):
    assert preset_values("flat", family) == [1.0] * len(block_names(family))


def test_ramps_are_linear_and_monotonic(family):
    up = unet_part(preset_values("ramp_in_out", family))
    down = unet_part(preset_values("ramp_out_in", family))
    assert (up[0], up[-1]) == (0.0, 1.0)
    steps = [b - a for a, b in pairwise(up)]
    assert all(step == pytest.approx(1 / (len(up) - 1), abs=1e-12) for step in steps)
    assert all(step > 0 for step in steps)
    assert down == pytest.approx(up[::-1], abs=1e-12)
    assert all(b < a for a, b in pairwise(down))


def test_heavy_presets_weigh_their_part(family):
    names = block_names(family)
    middle = names.index("M00")
    for preset, heavy in (("in_heavy", "IN"), ("out_heavy", "OUT")):
        values = dict(zip(names, preset_values(preset, family), strict=True))
        heavy_values = [v for n, v in values.items() if n.startswith(heavy)]
        light_values = [v for n, v in values.items() if n.startswith(("IN", "OUT")) and not n.startswith(heavy)]
        assert min(heavy_values) > values["M00"] > max(light_values)
    peak = preset_values("middle_heavy", family)
    assert max(peak) == peak[middle] == 1.0
    assert unet_part(peak)[0] == unet_part(peak)[-1] == 0.0


@pytest.mark.parametrize("family", [SD3_MEDIUM, SD35_MEDIUM, SD35_LARGE])
def test_sd3_ramps_are_one_straight_line_over_the_joint_blocks(family):
    up = preset_values("ramp_in_out", family)[1:]
    assert (up[0], up[-1]) == (0.0, 1.0)
    assert all(b - a == pytest.approx(1 / (len(up) - 1), abs=1e-12) for a, b in pairwise(up))
    assert preset_values("ramp_out_in", family)[1:] == pytest.approx(up[::-1], abs=1e-12)


def test_flux_ramps_rise_over_the_double_blocks_to_the_middle_then_over_the_single_blocks():
    values = dict(zip(FLUX_NAMES, preset_values("ramp_in_out", FLUX), strict=True))
    double = [values[f"D{i:02d}"] for i in range(19)]
    single = [values[f"S{i:02d}"] for i in range(38)]
    assert (values["BASE"], double[0], single[-1]) == (0.0, 0.0, 1.0)
    assert all(b - a == pytest.approx(0.5 / 18.5, abs=1e-12) for a, b in pairwise(double))
    assert all(b - a == pytest.approx(0.5 / 37.5, abs=1e-12) for a, b in pairwise(single))
    # the middle value 0.5 lies half a step past D18 and half a step before S00
    assert 0.5 - double[-1] == pytest.approx(0.5 / 18.5 / 2, abs=1e-12)
    assert single[0] - 0.5 == pytest.approx(0.5 / 37.5 / 2, abs=1e-12)


@pytest.mark.parametrize(
    ("family", "entry", "exit"),
    [
        (FLUX, [f"D{i:02d}" for i in range(19)], [f"S{i:02d}" for i in range(38)]),
        (SD3_MEDIUM, [f"J{i:02d}" for i in range(12)], [f"J{i:02d}" for i in range(12, 24)]),
        (SD35_LARGE, [f"J{i:02d}" for i in range(19)], [f"J{i:02d}" for i in range(19, 38)]),
    ],
)
def test_transformer_presets_read_the_way_in_and_out(family, entry, exit):
    """in_heavy / out_heavy: the double blocks (Flux) or the first half of the joint blocks (SD3)
    are the way in, the single blocks or the second half the way out; middle_heavy peaks between."""
    assert len(entry) + len(exit) + 1 == len(block_names(family))
    for preset, inside, outside, base in (("in_heavy", 1.0, 0.0, 1.0), ("out_heavy", 0.0, 1.0, 0.0)):
        values = dict(zip(block_names(family), preset_values(preset, family), strict=True))
        assert {values[n] for n in entry} == {inside} and {values[n] for n in exit} == {outside}
        assert values["BASE"] == base
    peak = dict(zip(block_names(family), preset_values("middle_heavy", family), strict=True))
    assert peak[entry[0]] == peak[exit[-1]] == 0.0
    assert max(peak.values()) in (peak[entry[-1]], peak[exit[0]])
    assert all(a < b for a, b in pairwise(peak[n] for n in entry))
    assert all(a > b for a, b in pairwise(peak[n] for n in exit))


def test_a_preset_with_overrides():
    values = parse_blocks("Ramp_In_Out, M00=0, VAE=0.2", SD1, param="alpha", default=0.5)
    ramp = preset_values("ramp_in_out", SD1)
    assert values.as_list() == [*ramp[:13], 0.0, *ramp[14:]]
    assert values.value("VAE") == 0.2
    assert parse_blocks(values.to_text(), SD1, param="alpha", default=0.5) == values


def test_unknown_preset_lists_the_presets():
    with pytest.raises(RequestError, match=r"^blocks\.alpha: 'ramp' is not a number or a preset \(.*ramp_in_out"):
        parse_blocks("ramp", SD1, param="alpha", default=0.5)
    with pytest.raises(RequestError, match="ramp_in_out"):
        preset_values("ramp", SD1)


def test_presets_returns_a_copy():
    presets()["flat"]["BASE"] = 0
    assert preset_values("flat", SD1)[0] == 1.0
