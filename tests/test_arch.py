"""Architecture detection from key names, on the real key tables."""

import json
from pathlib import Path

import pytest
from conftest import SD15, variant_specs

from lib_merge import arch
from lib_merge.synthetic import layout

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.parametrize(("table", "family"), [("sd15", "SD1"), ("sdxl", "SDXL")])
def test_packaged_tables(table, family):
    assert arch.family_of(layout(table)) == family


@pytest.mark.parametrize(("table", "family"), [("sd3", "SD3"), ("flux", "Flux")])
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
