"""Output precision (MergeRequest.dtype) on real files: which dtype each tensor gets, and that the one
rounding into it is the correct one, against an independent reference that enumerates every value
of the 8- and 16-bit formats and picks the nearest (ties to the even bit pattern)."""

from __future__ import annotations

import functools
import json
import struct

import pytest
import safetensors.torch
import torch
from conftest import POSITION_IDS, SD15, load, make
from image_host import sd15_module
from test_cli import cli

from lib_merge import FolderHost, MergeRequest, RequestError, merge, merge_into, precision, preflight
from lib_merge.cli import main as cli_main
from lib_merge.cli.recipes import recipe_of
from lib_merge.methods import get_method
from lib_merge.recipe import parse_recipe, request_from_recipe

NARROW = (torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)
NAMES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float8_e4m3fn: "fp8_e4m3fn",
    torch.float8_e5m2: "fp8_e5m2",
}
KEY = "model.diffusion_model.values"  # "model" in the name: the built-in merges it


# --- the independent reference ---------------------------------------------------------------


@functools.cache
def every_value(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Every finite value of an 8- or 16-bit float type as float64, ascending, and its bit pattern."""
    width = dtype.itemsize * 8
    patterns = torch.arange(2**width, dtype=torch.int64)
    stored = patterns.to(torch.int16 if width == 16 else torch.uint8)  # the same bits, wrapped
    values = stored.view(dtype).double()
    finite = values.isfinite()
    values, patterns = values[finite], patterns[finite]
    order = torch.argsort(values, stable=True)
    return values[order], patterns[order]


def nearest(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` (float64) rounded to the nearest value of ``dtype``, ties to the even bit pattern; fp8
    saturates at its largest finite value, NaN stays NaN. For 16-bit types ``x`` stays in range."""
    values, patterns = every_value(dtype)
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        x = x.clamp(-values[-1], values[-1])
    assert x[x.isfinite()].abs().max() <= values[-1]
    upper = torch.searchsorted(values, x).clamp(1, len(values) - 1)
    lower = upper - 1
    below, above = x - values[lower], values[upper] - x
    even_upper = patterns[upper] % 2 == 0
    pick_upper = (above < below) | ((above == below) & even_upper)
    return torch.where(x.isnan(), x, torch.where(pick_upper, values[upper], values[lower]))


def hard_cases(dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Values of ``dtype``, the halfway points between them and points just off those (where
    rounding through float32 goes wrong), subnormals, and random values, as float64."""
    values, _ = every_value(dtype)
    positive = values[values > 0]
    halfway = (positive[1:] + positive[:-1]) / 2
    off = halfway * 2.0**-35  # far below float32's resolution, far above float64's
    generator = torch.Generator().manual_seed(seed)
    random = torch.randn(4000, generator=generator, dtype=torch.float64)
    cases = torch.cat([positive, halfway, halfway + off, halfway - off, random, random * positive[0] * 16])
    return torch.cat([cases, -cases])


def same(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    return bool(((actual == expected) | (actual.isnan() & expected.isnan())).all())


# --- helpers ---------------------------------------------------------------------------------


def folder_with(tmp_path, a: dict, b: dict):
    models = tmp_path / "models"
    models.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(a, str(models / "a.safetensors"))
    safetensors.torch.save_file(b, str(models / "b.safetensors"))
    return FolderHost(models, hash_cache=tmp_path / "hashes.json", device="cpu")


def identity_merge(host, path: str, dtype: str, name: str = "out") -> dict[str, torch.Tensor]:
    """A merged at weight 0 by one of the engine's three paths: ``flat`` (a weighted sum, slice by
    slice), ``whole`` (a nested recipe, whole tensors) or ``copy`` (No interpolation)."""
    if path == "flat":
        request = MergeRequest("a.safetensors", "b.safetensors", multiplier=0.0, dtype=dtype, custom_name=name)
    elif path == "copy":
        request = MergeRequest("a.safetensors", interp_method="No interpolation", dtype=dtype, custom_name=name)
    else:
        inner = {"method": "weighted_sum", "models": ["a.safetensors", "b.safetensors"], "params": {"alpha": 0.0}}
        node = {"method": "weighted_sum", "models": [inner, "b.safetensors"], "params": {"alpha": 0.0}}
        request = request_from_recipe({"merge": node, "output": {"dtype": dtype, "custom_name": name}})
    return load(merge(request, host).path)


def header_dtypes(path, schedule: bool = False) -> set[str]:
    """The dtypes a safetensors header names, read straight from the file: of the model's parts
    (keys with a module in their name), or of the noise schedule's buffers (keys without)."""
    with open(path, "rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(length))
    return {entry["dtype"] for key, entry in header.items() if key != "__metadata__" and ("." in key) != schedule}


# --- rounding and saturation -----------------------------------------------------------------


@pytest.mark.parametrize("path", ["flat", "whole", "copy"])
@pytest.mark.parametrize("dtype", NARROW, ids=[NAMES[d] for d in NARROW])
def test_each_path_rounds_the_primarys_float64_values_once_to_the_nearest(tmp_path, dtype, path):
    values = hard_cases(dtype)
    host = folder_with(tmp_path, {KEY: values}, {KEY: torch.zeros_like(values)})
    out = identity_merge(host, path, NAMES[dtype])[KEY]
    assert out.dtype == dtype
    expected = nearest(values, dtype)
    assert same(out.double(), expected)
    # torch's own float64 -> float32 -> dtype conversion rounds twice: these cases catch it
    assert not same(values.to(dtype).double(), expected)


def test_fp32_output_is_the_float64_value_rounded_once(tmp_path):
    values = hard_cases(torch.float16) * torch.pi  # bits beyond float32's
    host = folder_with(tmp_path, {KEY: values}, {KEY: torch.zeros_like(values)})
    out = identity_merge(host, "flat", "fp32")[KEY]
    assert out.dtype == torch.float32 and torch.equal(out, values.float())  # a direct, single rounding


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3fn", "e5m2"])
def test_fp8_saturates_at_its_largest_value_and_never_overflows_to_inf_or_nan(tmp_path, dtype):
    largest = torch.finfo(dtype).max
    big = torch.tensor([1e6, -1e6, 449.0, 464.0, 1000.0, 57344.0, 61440.0, 65536.0, 1e30, 0.5])
    host = folder_with(tmp_path, {KEY: big}, {KEY: torch.zeros_like(big)})
    out = identity_merge(host, "flat", NAMES[dtype])[KEY].double()
    assert out.isfinite().all()
    assert out[0] == largest and out[1] == -largest and out[-1] == 0.5
    assert same(out, nearest(big.double(), dtype))

    specials = torch.tensor([float("inf"), -float("inf"), float("nan"), 1e6])
    host = folder_with(tmp_path / "specials", {KEY: specials}, {KEY: specials})
    out = identity_merge(host, "copy", NAMES[dtype], "specials")[KEY].double()
    assert out.tolist()[:2] == [largest, -largest] and out[2].isnan() and out[3] == largest


def test_fp8_in_and_out_at_weight_zero_keeps_every_value(tmp_path):
    """Every finite e4m3fn value through a weighted sum at 0: the same bytes (a zero may lose its
    sign: -0 + 0 is +0 in the float64 arithmetic, as in the built-in's)."""
    values, _ = every_value(torch.float8_e4m3fn)
    a = {KEY: values.to(torch.float8_e4m3fn)}
    host = folder_with(tmp_path, a, {KEY: torch.ones_like(values).to(torch.float8_e4m3fn)})
    for dtype in ("fp8_e4m3fn", "keep", ""):
        out = identity_merge(host, "flat", dtype, f"out{dtype}")[KEY]
        assert out.dtype == torch.float8_e4m3fn, dtype
        nonzero = values != 0
        assert torch.equal(out.view(torch.uint8)[nonzero], a[KEY].view(torch.uint8)[nonzero]), dtype
        assert torch.equal(out.double(), values), dtype


def test_an_sd_checkpoint_in_fp8_round_trips_byte_for_byte(tmp_path):
    models = tmp_path / "models"
    a = make(models / "a.safetensors", seed=1, dtype=torch.float8_e5m2)
    make(models / "b.safetensors", seed=2, dtype=torch.float8_e5m2)
    host = FolderHost(models, hash_cache=tmp_path / "hashes.json", device="cpu")
    out = identity_merge(host, "flat", "fp8_e5m2")
    for key, tensor in load(a).items():
        assert out[key].dtype == tensor.dtype, key
        if not tensor.is_floating_point():
            assert torch.equal(out[key], tensor), key
            continue
        nonzero = tensor.double() != 0  # -0 + 0 is +0 (see above)
        assert torch.equal(out[key].view(torch.uint8)[nonzero], tensor.view(torch.uint8)[nonzero]), key


# --- which dtype each tensor gets ------------------------------------------------------------


@pytest.fixture
def mixed(tmp_path):
    """A in float16 and B in float32, SD1.5 keys (position ids in int64)."""
    models = tmp_path / "mixed"
    make(models / "a.safetensors", seed=1)
    make(models / "b.safetensors", seed=2, dtype=torch.float32)
    return FolderHost(models, hash_cache=tmp_path / "hashes.json", device="cpu")


def merged(host, **options) -> dict[str, torch.Tensor]:
    request = MergeRequest("a.safetensors", "b.safetensors", multiplier=0.3, overwrite=True, **options)
    return load(merge(request, host).path)


def test_the_default_is_the_builtins_type_promotion_and_keep_is_the_primarys(mixed):
    default = merged(mixed, custom_name="default")
    kept = merged(mixed, dtype="keep", custom_name="kept")
    merged_keys = [k for k in SD15 if "model" in k and k != POSITION_IDS]
    assert {default[k].dtype for k in merged_keys} == {torch.float32}  # float16 + float32, as the built-in
    assert {kept[k].dtype for k in SD15 if k != POSITION_IDS} == {torch.float16}
    a, b = load(mixed.models_dir / "a.safetensors"), load(mixed.models_dir / "b.safetensors")
    for key in merged_keys:
        exact = get_method("weighted_sum").func(a[key].double(), b[key].double(), alpha=0.3)
        assert same(kept[key].double(), nearest(exact, torch.float16)), key


@pytest.mark.parametrize("dtype", ["keep", "fp32", "fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2", ""])
def test_integer_tensors_are_copied_unchanged_whatever_the_precision(mixed, dtype):
    out = merged(mixed, dtype=dtype, custom_name=f"ints{dtype}")
    a = load(mixed.models_dir / "a.safetensors")
    assert out[POSITION_IDS].dtype == torch.int64 and torch.equal(out[POSITION_IDS], a[POSITION_IDS])
    floats = {out[k].dtype for k in out if k != POSITION_IDS and "." in k}
    assert len(floats) == 1 or dtype == ""


def test_the_default_keeps_torchs_conversion_and_a_chosen_fp16_rounds_correctly(host, models):
    """Two float16 models: the default writes what torch's conversion of the float64 result gives
    (the bytes of every release before), fp16 the correctly rounded value; they differ somewhere."""
    default = merged(host, custom_name="default")
    chosen = merged(host, dtype="fp16", custom_name="chosen")
    a, b = load(models / "a.safetensors"), load(models / "b.safetensors")
    differ = 0
    for key in (k for k in SD15 if "model" in k and k != POSITION_IDS):
        exact = get_method("weighted_sum").func(a[key].double(), b[key].double(), alpha=0.3)
        assert torch.equal(default[key], exact.to(torch.float16)), key
        assert same(chosen[key].double(), nearest(exact, torch.float16)), key
        differ += int((default[key] != chosen[key]).sum())
    assert differ > 0


def test_save_as_half_is_still_the_builtins_float32_to_float16_only(tmp_path):
    models = tmp_path / "models"
    make(models / "a.safetensors", seed=1, dtype=torch.bfloat16)
    make(models / "b.safetensors", seed=2, dtype=torch.float32)
    host = FolderHost(models, hash_cache=tmp_path / "hashes.json", device="cpu")
    half = merged(host, save_as_half=True, custom_name="half")
    merged_key, copied_key = "model.diffusion_model.out.2.weight", "betas"
    assert half[merged_key].dtype == torch.float16  # bf16 + fp32 -> fp32 -> float16
    assert half[copied_key].dtype == torch.bfloat16  # A's bf16 copy stays bf16
    every = merged(host, save_as_half=True, dtype="fp16", custom_name="every")  # dtype fp16: every float tensor
    assert {every[k].dtype for k in every if k != POSITION_IDS and "." in k} == {torch.float16}


@pytest.mark.parametrize("dtype", ["fp8_e4m3fn", "bf16", "fp32"])
def test_the_noise_schedules_buffers_keep_their_dtype_and_values(host, models, dtype):
    """alphas_cumprod and the other schedule buffers (keys with no module in their name) are what
    the webui samples with: in fp8 they would keep 3 bits, and every image would change."""
    out = merged(host, dtype=dtype, custom_name=f"schedule{dtype}")
    a = load(models / "a.safetensors")
    schedule = [key for key in SD15 if "." not in key]
    assert "alphas_cumprod" in schedule and len(schedule) == 12
    for key in schedule:
        assert out[key].dtype == a[key].dtype and torch.equal(out[key], a[key]), key
    assert out["model.diffusion_model.out.2.weight"].dtype == precision.DTYPES[dtype]


def test_mixed_fp8_and_fp16_inputs_promote_to_float16(tmp_path):
    models = tmp_path / "models"
    make(models / "a.safetensors", seed=1, dtype=torch.float8_e4m3fn)
    make(models / "b.safetensors", seed=2)
    host = FolderHost(models, hash_cache=tmp_path / "hashes.json", device="cpu")
    out = merged(host, custom_name="promoted")
    assert out["model.diffusion_model.out.2.weight"].dtype == torch.float16
    assert out["betas"].dtype == torch.float8_e4m3fn  # copied from A as it is


def test_preflight_names_the_output_dtypes(mixed):
    report = preflight(MergeRequest("a.safetensors", "b.safetensors", dtype="bf16"), mixed)
    assert "Output dtypes: bfloat16 (1130 keys), float16 (12 keys), int64 (1 key) (every floating-point" in report
    report = preflight(MergeRequest("a.safetensors", "b.safetensors"), mixed)
    assert "(as the built-in: the inputs' type promotion)" in report


# --- bad requests ----------------------------------------------------------------------------


def test_an_unknown_precision_is_refused_naming_the_field():
    for bad in ("fp64", "float16", 16, "FP16"):
        with pytest.raises(RequestError, match=r"^dtype: unknown output precision"):
            MergeRequest("a.safetensors", "b.safetensors", dtype=bad)
    assert MergeRequest("a.safetensors", dtype="builtin").dtype == ""


def test_save_as_half_with_another_precision_is_refused_naming_both():
    with pytest.raises(RequestError, match=r"^save_as_half and dtype: .* bf16"):
        MergeRequest("a.safetensors", "b.safetensors", save_as_half=True, dtype="bf16")
    assert MergeRequest("a.safetensors", "b.safetensors", save_as_half=True, dtype="fp16").dtype == "fp16"


# --- Try: the loaded model holds what loading the file gives ---------------------------------


@pytest.mark.parametrize("dtype", ["bf16", "fp8_e4m3fn"])
@pytest.mark.parametrize("live", [torch.float32, torch.float16])
def test_try_rounds_to_the_output_precision_then_to_the_models_dtype(host, models, dtype, live):
    request = MergeRequest("a.safetensors", "b.safetensors", multiplier=0.35, dtype=dtype, custom_name="tried")
    module = sd15_module(dtype=live)
    merge_into(request, host, module.state_dict())
    saved = load(merge(request, host).path)
    output = {"bf16": torch.bfloat16, "fp8_e4m3fn": torch.float8_e4m3fn}[dtype]
    for key, tensor in module.state_dict().items():
        assert torch.equal(tensor, saved[key].to(tensor.dtype)), key  # as loading the file would
        if "." not in key:  # the noise schedule's buffers keep their dtype
            continue
        assert saved[key].dtype == (output if saved[key].is_floating_point() else torch.int64), key
        if saved[key].is_floating_point():
            assert torch.equal(tensor, tensor.to(output).to(tensor.dtype)), key  # values of the output's dtype


# --- the edges: CLI, API, recipes and metadata, the tab ---------------------------------------


@pytest.fixture(autouse=True)
def private_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def in_process(capsys, *args) -> tuple[int, str, str]:
    """The command line's main() in this process (exit status, stdout, stderr): no torch import."""
    try:
        status = cli_main([str(arg) for arg in args])
    except SystemExit as refused:  # argparse's refusals
        status = refused.code
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.slow  # one run of the command line as a user runs it, importing torch
def test_the_cli_writes_the_chosen_dtype(models, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    done = cli(
        "merge", models / "a.safetensors", models / "b.safetensors", "--alpha", "0.3", "--dtype", "bf16", "-o", out
    )
    assert done.returncode == 0, done.stderr
    assert header_dtypes(out) == {"BF16", "I64"}
    a_and_b = (models / "a.safetensors", models / "b.safetensors")
    status, _, err = in_process(capsys, "merge", *a_and_b, "--dtype", "fp8_e4m3fn", "-o", out, "--overwrite")
    assert status == 0, err
    assert header_dtypes(out) == {"F8_E4M3", "I64"}

    status, _, err = in_process(
        capsys, "merge", *a_and_b, "--half", "--dtype", "bf16", "-o", tmp_path / "x.safetensors"
    )
    assert status == 1 and "save_as_half and dtype" in err
    status, _, err = in_process(capsys, "merge", *a_and_b, "--dtype", "fp64", "-o", tmp_path / "x.safetensors")
    assert status == 2 and "--dtype: invalid choice: 'fp64'" in err
    _, dry, _ = in_process(capsys, "merge", *a_and_b, "--dtype", "keep", "-o", tmp_path / "x.safetensors", "--dry-run")
    assert "Output dtypes: float16 (1142 keys), int64 (1 key) (the primary model's dtype at each key)" in dry
    assert not (tmp_path / "x.safetensors").exists()


def test_a_recipe_carries_the_precision_into_the_file_and_its_replay(host, models, tmp_path):
    text = (
        "merge: {method: weighted_sum, models: [a.safetensors, b.safetensors], params: {alpha: 0.3}}\n"
        "output: {dtype: fp8_e5m2, custom_name: from-recipe}\n"
    )
    result = merge(request_from_recipe(parse_recipe(text)), host)
    assert header_dtypes(result.path) == {"F8_E5M2", "I64"}
    recipe = recipe_of(result.path)
    assert recipe["output"]["dtype"] == "fp8_e5m2"
    replayed = merge(request_from_recipe(recipe, output_path=str(tmp_path / "replayed.safetensors")), host)
    assert replayed.path.read_bytes() == result.path.read_bytes()

    default = merge(MergeRequest("a.safetensors", "b.safetensors", custom_name="plain"), host)
    # The built-in's precision is no field: recipes and their hashes from before dtype stay the same.
    assert "dtype" not in default.recipe and "dtype" not in recipe_of(default.path)["output"]
    with pytest.raises(RequestError, match=r"^dtype: unknown output precision 'int8'"):
        request_from_recipe(parse_recipe(text.replace("fp8_e5m2", "int8")))


def test_the_api_takes_dtype_and_names_it_when_wrong(host, models):
    fastapi = pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from lib_merge.api import add_routes

    app = fastapi.FastAPI()
    add_routes(app, host)
    client = TestClient(app)
    body = {"primary_model_name": "a.safetensors", "secondary_model_name": "b.safetensors", "custom_name": "api"}
    response = client.post("/merge-lab/v1/merge", json={**body, "dtype": "bf16"})
    assert response.status_code == 200, response.text
    assert header_dtypes(response.json()["path"]) == {"BF16", "I64"}
    response = client.post("/merge-lab/v1/merge", json={**body, "dtype": "fp64"})
    assert response.status_code == 422 and response.json()["detail"].startswith("dtype: unknown output precision")
    recipe = {"merge": {"method": "soup", "models": ["a.safetensors", "b.safetensors"]}, "output": {"dtype": "keep"}}
    response = client.post("/merge-lab/v1/merge", json={"recipe": recipe})
    assert response.status_code == 200, response.text
    assert header_dtypes(response.json()["path"]) == {"F16", "I64"}


@pytest.mark.gradio_both
def test_the_tab_has_an_output_precision_that_reaches_the_request(host):
    pytest.importorskip("gradio")
    from lib_merge import actions
    from lib_merge.ui import tab as tab_module
    from lib_merge.ui.recipe_fields import controls_from_recipe

    props = {c["props"].get("elem_id"): c["props"] for c in tab_module.build_tab(host).config["components"]}
    dropdown = props["merge_lab_dtype"]
    choices = [c[0] if isinstance(c, (list, tuple)) else c for c in dropdown["choices"]]
    assert choices == ["builtin", "keep", "fp32", "fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2"]
    assert dropdown["value"] == "builtin"

    def request_of(**values):
        named = dict.fromkeys(tab_module.ALL_FIELDS)
        named.update(primary_model_name="a.safetensors", secondary_model_name="b.safetensors", multiplier=0.3)
        named.update({"interp_method": "Weighted sum", **values})
        return actions.request_from_fields(tab_module._request_fields(named))[0]

    assert request_of(dtype="builtin").dtype == "" and request_of(dtype="bf16").dtype == "bf16"
    soup = request_of(interp_method="Model soup", dtype="fp8_e4m3fn")  # the method controls make a recipe
    assert soup.tree is not None and soup.dtype == "fp8_e4m3fn"
    with pytest.raises(RequestError, match="save_as_half and dtype"):
        request_of(dtype="bf16", save_as_half=True)
    assert "Output dtypes: bfloat16" in tab_module._preflight_text(host, {**dict.fromkeys(tab_module.ALL_FIELDS),
        "primary_model_name": "a.safetensors", "secondary_model_name": "b.safetensors",
        "interp_method": "Weighted sum", "multiplier": 0.3, "dtype": "bf16"})  # fmt: skip
    recipe = {"merge": {"method": "soup", "models": ["a.safetensors", "b.safetensors"]}}
    assert controls_from_recipe(recipe)["dtype"] == "builtin"  # a recipe without one: the built-in's
    assert controls_from_recipe({**recipe, "output": {"dtype": "bf16"}})["dtype"] == "bf16"
