"""Architecture detection from key names, on the real key tables."""

import json
from pathlib import Path

import pytest
from conftest import SD15, variant_specs
from transformer_layouts import SD35_MEDIUM_ATTN2_BLOCKS, flux_keys, sd3_keys

from lib_merge import arch
from lib_merge.synthetic import layout

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.parametrize(("table", "family"), [("sd15", "SD1"), ("sdxl", "SDXL")])
def test_packaged_tables(table, family):
    assert arch.family_of(layout(table)) == family


@pytest.mark.parametrize(("table", "family"), [("sd3", "SD3 medium"), ("flux", "Flux dev")])
def test_shared_tables(table, family):
    path = SHARED / f"{table}_shapes.json"
    if not path.exists():
        pytest.skip(f"{path} not beside the project")
    assert arch.family_of(json.loads(path.read_text())) == family


def test_variants_and_unknown():
    shapes = variant_specs(SD15, 9)
    assert arch.describe(shapes, lambda k: shapes[k].shape) == "SD1 inpainting"
    shapes = variant_specs(SD15, 8)
    assert arch.describe(shapes, lambda k: shapes[k].shape) == "SD1 instruct-pix2pix"
    assert arch.family_of(["encoder.conv_in.weight"]) == "unknown"
    assert arch.family_of(["cond_stage_model.model.ln_final.weight"]) == "SD2"
    assert arch.family_of(["conditioner.embedders.0.model.ln_final.weight"]) == "SDXL refiner"


@pytest.mark.parametrize("full", [True, False])
def test_flux_dev_and_schnell_full_or_bare(full):
    assert arch.family_of(flux_keys(full=full)) == arch.FLUX == "Flux dev"
    assert arch.family_of(flux_keys(full=full, guidance=False)) == arch.FLUX_SCHNELL == "Flux schnell"


@pytest.mark.parametrize("full", [True, False])
def test_sd3_sizes_from_the_count_of_joint_blocks(full):
    assert arch.family_of(sd3_keys(24, full=full)) == "SD3 medium"
    assert arch.family_of(sd3_keys(24, attn2_blocks=SD35_MEDIUM_ATTN2_BLOCKS, full=full)) == "SD3.5 medium"
    assert arch.family_of(sd3_keys(38, full=full)) == "SD3.5 large"
    assert arch.family_of(sd3_keys(12, full=full)) == "SD3"


def test_family_signs_tell_siblings_apart():
    assert arch.family_sign(arch.FLUX) == "guidance_in.* keys"
    assert arch.family_sign(arch.FLUX_SCHNELL) == "no guidance_in.* keys"
    assert arch.family_sign(arch.SD3_MEDIUM) == "24 joint blocks"
    assert arch.family_sign(arch.SD35_LARGE) == "38 joint blocks"
    assert arch.family_sign(arch.SD1) is None


def test_prediction_markers():
    keys = ["v_pred", "ztsnr", "model.diffusion_model.out.2.bias"]
    assert arch.prediction_markers(keys, {"modelspec.prediction_type": "v"}) == {
        "v_pred": "present",
        "ztsnr": "present",
        "modelspec.prediction_type": "'v'",
    }
    assert arch.prediction_markers(keys[2:], {}) == {
        "v_pred": "absent",
        "ztsnr": "absent",
        "modelspec.prediction_type": "not set",
    }
    long = arch.prediction_markers([], {"modelspec.prediction_type": "x" * 500})["modelspec.prediction_type"]
    assert len(long) <= 30
