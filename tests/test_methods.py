"""The merge methods against independent float64 references, their identities (hypothesis), the
``newest`` chooser of average_last, and the registry's checks of inputs and parameters."""

from __future__ import annotations

import inspect
import math
import os
import re
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lib_merge.errors import RequestError
from lib_merge.methods import METHODS, Param, get_method, listed_methods
from lib_merge.methods.soups import newest

KEY = "model.diffusion_model.middle_block.0.in_layers.0.weight"
TIGHT = {"rtol": 1e-12, "atol": 1e-12}
SETTINGS = settings(max_examples=40, deadline=None)


def rand(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def run(name: str, *tensors: torch.Tensor, key: str = KEY, **given) -> torch.Tensor:
    """``name`` applied as the engine applies it: counts and params checked, clones passed in."""
    method = get_method(name)
    method.check_input_count(len(tensors))
    repeated = len(tensors) - len(method.inputs) + 1 if method.variadic else None
    values = method.check_params(given, repeated)
    kwargs = {method.params[param].arg: value for param, value in values.items()}
    if method.keyed:
        kwargs["key"] = key
    return method.func(*(t.clone() for t in tensors), **kwargs)


# ---------------------------------------------------------------- independent float64 references


def soup_ref(models, weights=None, normalise=True):
    weights = list(weights) if weights else [1.0] * len(models)
    total = sum(w * m for w, m in zip(weights, models, strict=True))
    return total / sum(weights) if normalise else total


def task_arithmetic_ref(base, models, lam=1.0, weights=None):
    weights = list(weights) if weights else [1.0] * len(models)
    return base + lam * sum(w * (m - base) for w, m in zip(weights, models, strict=True))


def disjoint_mean_ref(deltas: list[torch.Tensor]) -> torch.Tensor:
    """Per element: the mean of the nonzero values whose sign is the sign of the elementwise sum."""
    flat = [d.flatten().tolist() for d in deltas]
    out = []
    for values in zip(*flat, strict=True):
        total = sum(values)
        sign = (total > 0) - (total < 0)
        agreeing = [v for v in values if v * sign > 0]
        out.append(sum(agreeing) / len(agreeing) if agreeing else 0.0)
    return torch.tensor(out, dtype=torch.float64).reshape(deltas[0].shape)


def top_k_ref(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = ceil(density * n) largest magnitudes (density taken as the exact decimal)."""
    values = delta.flatten().tolist()
    k = math.ceil(Fraction(str(density)) * len(values))
    kept = set(sorted(range(len(values)), key=lambda i: -abs(values[i]))[:k])
    return torch.tensor([v if i in kept else 0.0 for i, v in enumerate(values)], dtype=torch.float64).reshape(
        delta.shape
    )


def ties_ref(base, models, density, lam=1.0, weights=None):
    weights = list(weights) if weights else [1.0] * len(models)
    trimmed = [top_k_ref(w * (m - base), density) for w, m in zip(weights, models, strict=True)]
    return base + lam * disjoint_mean_ref(trimmed)


def slerp_ref(a, b, t):
    x, y = a.flatten().tolist(), b.flatten().tolist()
    dot = sum(p * q for p, q in zip(x, y, strict=True))
    omega = math.acos(dot / (math.sqrt(sum(p * p for p in x)) * math.sqrt(sum(q * q for q in y))))
    return (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)


def model_stock_ref(base, models):
    deltas = [(m - base).flatten().tolist() for m in models]

    def cosine(u, v):
        dot = sum(p * q for p, q in zip(u, v, strict=True))
        return dot / (math.sqrt(sum(p * p for p in u)) * math.sqrt(sum(q * q for q in v)))

    pairs = [(i, j) for i in range(len(deltas)) for j in range(i + 1, len(deltas))]
    cos = sum(cosine(deltas[i], deltas[j]) for i, j in pairs) / len(pairs)
    n = len(models)
    t = n * cos / (1 + (n - 1) * cos)
    return t * (sum(models) / n) + (1 - t) * base


# ---------------------------------------------------------------- each method against its reference


@pytest.mark.parametrize("normalise", [True, False])
@pytest.mark.parametrize("weights", [None, [0.2, 0.5, 1.3], [-0.5, 1.0, 2.25]])
def test_soup_matches_reference(weights, normalise):
    models = [rand(3, 5, seed=s) for s in range(3)]
    given = {"normalise": normalise} | ({"weights": weights} if weights else {})
    torch.testing.assert_close(run("soup", *models, **given), soup_ref(models, weights, normalise), **TIGHT)


def test_uniform_soup_is_the_plain_mean():
    models = [rand(4, 4, seed=s) for s in range(4)]
    torch.testing.assert_close(run("soup", *models), torch.stack(models).mean(0), **TIGHT)


def test_soup_weights_summing_to_zero_cannot_be_normalised():
    models = [rand(3, seed=s) for s in range(2)]
    with pytest.raises(RequestError, match=r"params\.weights: the weights sum to 0"):
        run("soup", *models, weights=[1.0, -1.0])
    torch.testing.assert_close(
        run("soup", *models, weights=[1.0, -1.0], normalise=False), models[0] - models[1], **TIGHT
    )


def test_average_last_is_the_mean_of_the_chosen_checkpoints():
    checkpoints = [rand(2, 3, seed=s) for s in range(3)]
    torch.testing.assert_close(run("average_last", *checkpoints, last=3), soup_ref(checkpoints), **TIGHT)


@pytest.mark.parametrize("lam", [1.0, 0.5, -0.7])
@pytest.mark.parametrize("weights", [None, [0.3, 1.2, -0.4]])
def test_task_arithmetic_matches_reference(lam, weights):
    base = rand(4, 6, seed=10)
    models = [base + rand(4, 6, seed=s, scale=0.1) for s in range(3)]
    got = run("task_arithmetic", base, *models, **{"lambda": lam, "weights": weights})
    torch.testing.assert_close(got, task_arithmetic_ref(base, models, lam, weights), **TIGHT)


@pytest.mark.parametrize(
    ("density", "lam", "weights"),
    [(0.2, 1.0, None), (0.5, 1.0, None), (0.35, 0.8, None), (0.5, -0.6, [1.0, 0.5, 2.0]), (1.0, 1.0, None)],
)
def test_ties_matches_reference(density, lam, weights):
    base = rand(4, 5, seed=20)  # 20 values: random normal deltas, no two magnitudes equal
    models = [base + rand(4, 5, seed=s, scale=0.1) for s in range(21, 24)]
    got = run("ties", base, *models, density=density, weights=weights, **{"lambda": lam})
    torch.testing.assert_close(got, ties_ref(base, models, density, lam, weights), **TIGHT)


def test_ties_keeps_exactly_k_values_per_task_vector():
    base = torch.zeros(40, dtype=torch.float64)
    delta = rand(40, seed=30)
    # One task vector: the disjoint mean is the trimmed vector itself.
    got = run("ties", base, delta, density=0.25)
    assert int((got != 0).sum()) == 10
    kept = got != 0
    assert delta[kept].abs().min() > delta[~kept].abs().max()
    torch.testing.assert_close(got[kept], delta[kept], rtol=0, atol=0)


def test_ties_k_is_ceil_of_the_decimal_density_times_n():
    base = torch.zeros(10, 10, dtype=torch.float64)
    delta = rand(10, 10, seed=31)
    got = run("ties", base, delta, density=0.55)
    assert int((got != 0).sum()) == 55


def test_ties_elects_sign_by_sum_and_takes_disjoint_mean():
    base = torch.zeros(3, dtype=torch.float64)
    models = [torch.tensor([3.0, -1.0, 2.0]), torch.tensor([-1.0, -1.0, -2.0]), torch.tensor([-1.0, 4.0, 1.0])]
    models = [m.double() for m in models]
    # Column 0: sum 1 > 0, only 3 agrees -> 3. Column 1: sum 2 > 0, only 4 -> 4. Column 2: sum 1 -> (2+1)/2.
    got = run("ties", base, *models, density=1.0)
    torch.testing.assert_close(got, torch.tensor([3.0, 4.0, 1.5], dtype=torch.float64), rtol=0, atol=0)


def _dare_dropped(base, models, p, seed=0, key=KEY):
    """Each model's dropped-and-rescaled delta D_i (weight 1), read back through one-hot weights."""
    dropped = []
    for i in range(len(models)):
        onehot = [1.0 if j == i else 0.0 for j in range(len(models))]
        dropped.append(run("dare", base, *models, p=p, seed=seed, weights=onehot, key=key) - base)
    return dropped


def test_dare_keeps_or_rescales_each_delta_value():
    p = 0.6
    base = rand(1000, seed=40)
    delta = rand(1000, seed=41).sign() * (0.5 + rand(1000, seed=42).abs())  # |delta| >= 0.5
    got = run("dare", base, base + delta, p=p, seed=7) - base
    dropped = torch.isclose(got, torch.zeros_like(got), rtol=0, atol=1e-12)
    rescaled = torch.isclose(got, delta / (1 - p), rtol=1e-12, atol=1e-12)
    assert bool((dropped | rescaled).all())
    assert not bool((dropped & rescaled).any())
    kept = rescaled.double().mean().item()
    assert abs(kept - (1 - p)) < 0.06, kept


def test_dare_masks_are_seeded_by_seed_key_and_model_index():
    base = torch.zeros(500, dtype=torch.float64)
    delta = torch.ones(500, dtype=torch.float64)

    def mask(seed=0, key=KEY, index=0):
        models = [delta.clone() for _ in range(index + 1)]
        weights = [1.0 if j == index else 0.0 for j in range(index + 1)]
        return run("dare", base, *models, p=0.5, seed=seed, key=key, weights=weights) != 0

    first = mask()
    assert torch.equal(first, mask())  # replays bit for bit
    assert torch.equal(run("dare", base, delta, p=0.5, seed=3), run("dare", base, delta, p=0.5, seed=3))
    assert not torch.equal(first, mask(key="model.diffusion_model.out.2.weight"))
    assert not torch.equal(first, mask(seed=1))
    assert not torch.equal(first, mask(index=1))
    # The mask does not depend on the values: another base and delta keep the same positions.
    other_base = rand(500, seed=43)
    other = run("dare", other_base, other_base + rand(500, seed=44).abs() + 1, p=0.5) - other_base
    assert torch.equal(first, ~torch.isclose(other, torch.zeros_like(other), atol=1e-12, rtol=0))


@pytest.mark.parametrize(("lam", "weights"), [(1.0, None), (-0.5, [0.5, 2.0, -1.0])])
def test_dare_sums_the_dropped_deltas(lam, weights):
    p = 0.7
    base = rand(6, 7, seed=50)
    models = [base + rand(6, 7, seed=s, scale=0.1) for s in range(51, 54)]
    dropped = _dare_dropped(base, models, p, seed=5)
    for d, m in zip(dropped, models, strict=True):  # each D_i is 0 or (M_i - base) / (1 - p)
        zero = torch.isclose(d, torch.zeros_like(d), rtol=0, atol=1e-12)
        assert bool((zero | torch.isclose(d, (m - base) / (1 - p), rtol=1e-10, atol=1e-12)).all())
    w = weights or [1.0] * 3
    expected = base + lam * sum(wi * d for wi, d in zip(w, dropped, strict=True))
    got = run("dare", base, *models, p=p, seed=5, weights=weights, **{"lambda": lam})
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_dare_sign_election_is_the_disjoint_mean_of_the_dropped_deltas():
    p, lam, weights = 0.5, 0.8, [1.0, 0.5, 2.0]
    base = torch.zeros(5, 8, dtype=torch.float64)  # zero base: D_i comes back exactly
    models = [rand(5, 8, seed=s) for s in range(60, 63)]
    dropped = _dare_dropped(base, models, p, seed=9)
    expected = lam * disjoint_mean_ref([w * d for w, d in zip(weights, dropped, strict=True)])
    got = run("dare", base, *models, p=p, seed=9, weights=weights, sign_election=True, **{"lambda": lam})
    torch.testing.assert_close(got, expected, **TIGHT)
    # Some elements really disagree in sign, so this differs from the plain sum.
    assert not torch.allclose(got, lam * sum(w * d for w, d in zip(weights, dropped, strict=True)))


def test_dare_mean_over_many_seeds_approaches_the_delta():
    p, seeds = 0.5, 400
    base = rand(64, seed=70)
    delta = rand(64, seed=71)
    mean = sum(run("dare", base, base + delta, p=p, seed=s) - base for s in range(seeds)) / seeds
    # Each element's estimate has standard deviation |delta| sqrt(p / (1 - p) / seeds) = |delta| / 20.
    error = ((mean - delta).norm() / delta.norm()).item()
    assert error < 0.12, error


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.8, 1.0])
def test_slerp_matches_textbook_formula(t):
    a, b = rand(3, 4, seed=80), rand(3, 4, seed=81)
    torch.testing.assert_close(run("slerp", a, b, t=t), slerp_ref(a, b, t), **TIGHT)


def test_slerp_falls_back_to_lerp_for_parallel_or_zero_tensors():
    a = rand(10, seed=82)
    for b in (2 * a, -3 * a, 2 * a + rand(10, seed=83, scale=1e-4), torch.zeros_like(a)):
        got = run("slerp", a, b, t=0.3)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, 0.7 * a + 0.3 * b, **TIGHT)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_model_stock_matches_reference(n):
    base = rand(4, 6, seed=90)
    shared = rand(4, 6, seed=91, scale=0.1)
    models = [base + shared + rand(4, 6, seed=100 + i, scale=0.1) for i in range(n)]
    torch.testing.assert_close(run("model_stock", base, *models), model_stock_ref(base, models), **TIGHT)


def test_model_stock_orthogonal_deltas_give_the_base_and_identical_ones_the_mean():
    base = rand(4, seed=92)
    e = torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(run("model_stock", base, base + e[0], base + e[1]), base, **TIGHT)  # cos 0: t 0
    delta = rand(4, seed=93)
    torch.testing.assert_close(run("model_stock", base, base + delta, base + delta), base + delta, **TIGHT)


# ---------------------------------------------------------------- identities (hypothesis)

finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False)


def vectors(n: int):
    return st.lists(finite, min_size=n, max_size=n).map(lambda v: torch.tensor(v, dtype=torch.float64))


@SETTINGS
@given(data=st.data(), size=st.integers(1, 8), count=st.integers(2, 5), weighted=st.booleans())
def test_soup_of_identical_models_is_that_model(data, size, count, weighted):
    model = data.draw(vectors(size))
    weights = data.draw(st.lists(st.floats(0.1, 3.0), min_size=count, max_size=count)) if weighted else None
    got = run("soup", *[model] * count, weights=weights)
    torch.testing.assert_close(got, model, rtol=1e-13, atol=1e-300)


@SETTINGS
@given(data=st.data(), size=st.integers(1, 8), count=st.integers(1, 4))
def test_task_arithmetic_with_lambda_zero_is_the_base(data, size, count):
    base = data.draw(vectors(size))
    models = [data.draw(vectors(size)) for _ in range(count)]
    assert torch.equal(run("task_arithmetic", base, *models, **{"lambda": 0.0}), base)


@SETTINGS
@given(data=st.data(), size=st.integers(1, 8), lam=st.floats(-2, 2))
def test_ties_with_one_vector_and_density_one_is_task_arithmetic(data, size, lam):
    base, model = data.draw(vectors(size)), data.draw(vectors(size))
    got = run("ties", base, model, density=1.0, **{"lambda": lam})
    torch.testing.assert_close(got, run("task_arithmetic", base, model, **{"lambda": lam}), rtol=1e-12, atol=1e-9)


@SETTINGS
@given(data=st.data(), size=st.integers(1, 8), count=st.integers(1, 3), lam=st.floats(-2, 2), seed=st.integers(0, 99))
def test_dare_with_p_zero_is_task_arithmetic(data, size, count, lam, seed):
    base = data.draw(vectors(size))
    models = [data.draw(vectors(size)) for _ in range(count)]
    weights = data.draw(st.lists(st.floats(-2, 2), min_size=count, max_size=count))
    got = run("dare", base, *models, p=0.0, seed=seed, weights=weights, **{"lambda": lam})
    expected = run("task_arithmetic", base, *models, weights=weights, **{"lambda": lam})
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(got, task_arithmetic_ref(base, models, lam, weights), rtol=1e-9, atol=1e-8)


@SETTINGS
@given(data=st.data(), size=st.integers(1, 8))
def test_slerp_ends_are_exact(data, size):
    a, b = data.draw(vectors(size)), data.draw(vectors(size))
    assert torch.equal(run("slerp", a, b, t=0.0), a)
    assert torch.equal(run("slerp", a, b, t=1.0), b)


@SETTINGS
@given(data=st.data(), size=st.integers(2, 8), t=st.floats(0, 1))
def test_slerp_keeps_the_norm_of_orthogonal_unit_vectors(data, size, t):
    x, y = data.draw(vectors(size)), data.draw(vectors(size))
    if x.norm() < 1e-3:
        return
    a = x / x.norm()
    y = y - (y @ a) * a
    if y.norm() < 1e-3:
        return
    b = y / y.norm()
    got = run("slerp", a, b, t=t)
    assert abs(got.norm().item() - 1.0) < 1e-9
    torch.testing.assert_close(got, math.cos(t * math.pi / 2) * a + math.sin(t * math.pi / 2) * b, **TIGHT)


@SETTINGS
@given(data=st.data(), size=st.integers(2, 8), t=st.floats(0, 1), scale=st.floats(0.1, 10))
def test_slerp_of_nearly_parallel_vectors_is_lerp(data, size, t, scale):
    a = data.draw(vectors(size))
    if a.norm() < 1:
        return
    noise = data.draw(st.lists(st.floats(-1, 1), min_size=size, max_size=size))
    b = scale * a + 1e-3 * a.norm() * scale * torch.tensor(noise, dtype=torch.float64) / math.sqrt(size)
    got = run("slerp", a, b, t=t)
    torch.testing.assert_close(got, (1 - t) * a + t * b, rtol=1e-12, atol=1e-9)


# ---------------------------------------------------------------- average_last's `newest` chooser


def touch(folder, name: str, mtime: float):
    path = folder / f"{name}.safetensors"
    path.write_bytes(b"")
    os.utime(path, (mtime, mtime))
    return path


def test_newest_orders_by_step_number_numerically(tmp_path):
    # mtimes deliberately the reverse of the steps: the number in the name wins.
    s900, s1200, s10000 = (touch(tmp_path, f"run-step-{n}", 3000 - i * 1000) for i, n in enumerate((900, 1200, 10000)))
    paths = [s10000, s900, s1200]
    assert newest(paths, {"last": 2}) == [s1200, s10000]
    assert newest(paths, {"last": 3}) == [s900, s1200, s10000]
    assert newest(paths, {"last": 1}) == [s10000]
    assert newest(paths, {"last": 10}) == [s900, s1200, s10000]


def test_newest_reads_leading_zeros_as_numbers(tmp_path):
    paths = [touch(tmp_path, "run-step-001200", 1), touch(tmp_path, "run-step-900", 2)]
    assert newest(paths, {"last": 1}) == [paths[0]]


@pytest.mark.parametrize("names", [("alpha", "beta", "gamma"), ("final", "run-step-5", "ema")])
def test_newest_without_step_numbers_orders_by_mtime(tmp_path, names):
    first, second, third = (touch(tmp_path, name, mtime) for name, mtime in zip(names, (300, 100, 200), strict=True))
    assert newest([first, second, third], {"last": 2}) == [third, first]
    assert newest([first, second, third], {"last": 3}) == [second, third, first]


def test_average_last_chooses_with_newest_and_checked_last(tmp_path):
    method = get_method("average_last")
    assert method.choose is newest
    paths = [touch(tmp_path, f"run-step-{n}", 1) for n in (2000, 500, 1500, 1000)]
    params = method.check_params({"last": "2"})
    assert method.choose(paths, params) == [paths[2], paths[0]]
    assert method.check_params({})["last"] == 3


def test_newest_breaks_equal_numbers_by_mtime(tmp_path):
    late, early = touch(tmp_path, "sd15-finetune-a", 200), touch(tmp_path, "sd15-finetune-b", 100)
    assert newest([late, early], {"last": 1}) == [late]


# ---------------------------------------------------------------- registry, inputs and parameters

ALL = {
    "weighted_sum",
    "add_difference",
    "no_interpolation",
    "slerp",
    "soup",
    "average_last",
    "model_stock",
    "task_arithmetic",
    "ties",
    "dare",
    "add_delta",
}
YEARS = {"soup": "2022", "task_arithmetic": "2023", "ties": "2023", "dare": "202[34]", "model_stock": "2024"}


def test_registry_lists_every_method_once():
    assert set(METHODS) == ALL
    # add_delta is a LoRA bake's step: recipes name it, the method lists do not offer it
    assert [m.name for m in listed_methods()] == [name for name in METHODS if name != "add_delta"]
    for attribute in ("cli_name", "label"):
        values = [getattr(m, attribute) for m in METHODS.values()]
        assert len(values) == len(set(values)), attribute
    for name, m in METHODS.items():
        assert m.name == name
        assert get_method(name) is m and get_method(m.cli_name) is m and get_method(m.label) is m


@pytest.mark.parametrize("name", sorted(ALL))
def test_method_metadata_is_consistent(name):
    m = METHODS[name]
    signature = inspect.signature(m.func)
    for param_name, param in m.params.items():
        assert isinstance(param, Param) and param.name == param_name
        assert param.arg in signature.parameters, (name, param.arg)
        if param.default is not None:
            assert param.check(param.default, "default") == param.default
    assert ("key" in signature.parameters) == m.keyed
    assert m.optional == () or set(m.optional) <= set(m.inputs)
    assert m.doc and re.search(r"[=*/+]|mean|sum|unchanged", m.doc), name


@pytest.mark.parametrize(("name", "year"), sorted(YEARS.items()))
def test_new_methods_cite_their_paper(name, year):
    doc = METHODS[name].doc
    assert re.search(rf"et al\. {year}", doc), doc
    assert re.search(r"[=*/+]|_i\b", doc), doc  # a formula, not only words


def test_unknown_method_is_refused_by_name():
    with pytest.raises(RequestError, match=r"unknown merge method 'frobnicate'.*known: .*task-arithmetic"):
        get_method("frobnicate")


@pytest.mark.parametrize(
    ("name", "count", "message"),
    [
        ("soup", 1, r"method soup takes 2 or more model\(s\) .*got 1"),
        ("weighted_sum", 3, r"method weighted-sum takes 2 model\(s\) \(a, b\), got 3"),
        ("model_stock", 2, r"method model-stock takes 3 or more model\(s\) \(base, models\.\.\..*got 2"),
        ("task_arithmetic", 1, r"method task-arithmetic takes 2 or more model\(s\).*got 1"),
        ("no_interpolation", 2, r"method no-interpolation takes 1 model\(s\) \(a\), got 2"),
    ],
)
def test_wrong_number_of_inputs_is_refused(name, count, message):
    with pytest.raises(RequestError, match=message):
        get_method(name).check_input_count(count)


@pytest.mark.parametrize(("name", "count"), [("soup", 2), ("soup", 7), ("weighted_sum", 2), ("average_last", 1)])
def test_right_number_of_inputs_is_accepted(name, count):
    get_method(name).check_input_count(count)


@pytest.mark.parametrize(
    ("name", "given", "repeated", "message"),
    [
        ("ties", {"density": 0}, 2, r"params\.density: 0 is outside \(0, 1\]"),
        ("ties", {"density": 1.5}, 2, r"params\.density: 1\.5 is outside \(0, 1\]"),
        ("dare", {"p": 1}, 2, r"params\.p: 1 is outside \[0, 1\)"),
        ("dare", {"p": -0.1}, 2, r"params\.p: -0\.1 is outside"),
        ("slerp", {"t": 1.5}, None, r"params\.t: 1\.5 is outside \[0, 1\]"),
        ("soup", {"weights": [1, 2]}, 3, r"params\.weights: expected 3 values .*got 2"),
        ("task_arithmetic", {"weights": "1,2,3"}, 2, r"params\.weights: expected 2 values .*got 3"),
        ("soup", {"alpha": 0.5}, 2, r"params\.alpha: method soup has no such parameter \(it has: weights, normalise\)"),
        ("weighted_sum", {"density": 0.5}, None, r"params\.density: method weighted-sum has no such parameter"),
        ("ties", {"density": "lots"}, 2, r"params\.density: expected a number, got 'lots'"),
        ("ties", {"lambda": None}, 2, r"params\.lambda: expected a number"),
        ("ties", {"lambda": float("nan")}, 2, r"params\.lambda: expected a finite number"),
        ("ties", {"lambda": True}, 2, r"params\.lambda: expected a finite number"),
        ("soup", {"weights": [1, "x"]}, 2, r"params\.weights\[1\]: expected a number, got 'x'"),
        ("soup", {"weights": 3}, 2, r"params\.weights: expected a list of numbers"),
        ("dare", {"seed": 1.5}, 2, r"params\.seed: expected a whole number"),
        ("dare", {"sign_election": "maybe"}, 2, r"params\.sign_election: expected true or false"),
        ("average_last", {"last": 0}, None, r"params\.last: 0 is outside \[1, inf\]"),
    ],
)
def test_invalid_params_are_refused(name, given, repeated, message):
    with pytest.raises(RequestError, match=message):
        get_method(name).check_params(given, repeated)


def test_valid_params_are_converted_and_defaults_filled():
    ties = get_method("ties")
    assert ties.check_params({"density": 1}, 2) == {"density": 1.0, "lambda": 1.0, "weights": None}
    assert ties.check_params({"density": "0.5", "weights": "1, 0.5"}, 2)["weights"] == (1.0, 0.5)
    dare = get_method("dare")
    values = dare.check_params({"p": 0, "seed": "3", "sign_election": "yes"}, 2)
    assert values == {"p": 0.0, "lambda": 1.0, "weights": None, "seed": 3, "sign_election": True}
    assert get_method("slerp").check_params({"t": 1}) == {"t": 1.0}
    assert get_method("weighted_sum").check_params({}) == {"alpha": 0.3}


@pytest.mark.parametrize("empty", [[], ""])
def test_empty_weights_mean_uniform(empty):
    for name in ("soup", "task_arithmetic", "ties", "dare"):
        assert not get_method(name).check_params({"weights": empty}, 3)["weights"], name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("n", "k"), [(1, 1), (1000, 1), (1000, 1000), (1000, 137), (12345, 6000)])
@pytest.mark.parametrize("small_selection", [0, 1 << 15])  # 0: radix selection at every size
def test_the_radix_selection_finds_the_kth_largest_magnitude_exactly(dtype, n, k, small_selection, monkeypatch):
    from lib_merge.methods import task_vectors
    from lib_merge.methods.task_vectors import _kth_largest

    monkeypatch.setattr(task_vectors, "SMALL_SELECTION", small_selection)
    values = torch.randn(n, generator=torch.Generator().manual_seed(n + k)).to(dtype).abs()
    values[: n // 10] = values[n // 2]  # repeated values at and around the cut
    assert _kth_largest(values, k) == values.sort(descending=True).values[k - 1]


# ------------------------------------------- TIES on tensors large enough to be sampled and sliced


def ties_float32_ref(base, models, density, lam):
    """TIES by sorting, in float32 from the stored values: the cut and the kept set, exactly."""
    deltas = [m.float() - base.float() for m in models]
    keep = math.ceil(Fraction(repr(density)) * base.numel())
    trimmed = []
    for delta in deltas:
        cut = delta.abs().flatten().sort(descending=True).values[keep - 1]
        trimmed.append(torch.where(delta.abs() >= cut, delta, torch.zeros_like(delta)))
    elected = sum(trimmed[1:], trimmed[0]).sign()
    agreeing = [torch.where(t * elected > 0, t, torch.zeros_like(t)) for t in trimmed]
    count = sum((a != 0).float() for a in agreeing).clamp_min(1)
    return base.float() + lam * (sum(agreeing[1:], agreeing[0]) / count), trimmed


LARGE = 300_007  # above the sampling threshold (4 x 65536) and more than one CPU slice (2**18)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("density", [0.2, 0.55, 0.97])
def test_ties_on_a_large_tensor_matches_the_sorting_reference_and_leaves_the_inputs_alone(dtype, density):
    base = rand(LARGE, seed=40).to(dtype)
    models = [(base.double() + rand(LARGE, seed=41 + i, scale=0.05)).to(dtype) for i in range(3)]
    before = [t.clone() for t in (base, *models)]
    got = get_method("ties").func(base, *models, density=density, lambda_=0.8, weights=None)
    want, _ = ties_float32_ref(base, models, density, 0.8)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-7, atol=1e-7)
    assert all(torch.equal(a, b) for a, b in zip(before, (base, *models), strict=True))


def test_ties_keeps_exactly_the_top_k_of_a_large_task_vector_with_repeated_magnitudes():
    base = torch.zeros(LARGE, dtype=torch.float16)
    delta = rand(LARGE, seed=50).to(torch.float16)
    delta[::3] = delta[7]  # a third of the values share one magnitude, near the cut
    got = get_method("ties").func(base, delta, density=0.3, lambda_=1.0, weights=None)
    _, (trimmed,) = ties_float32_ref(base, [delta], 0.3, 1.0)
    assert torch.equal(got, trimmed)
    assert int((got != 0).sum()) >= math.ceil(0.3 * LARGE)


def test_ties_finds_the_exact_cut_when_the_sample_misjudges_it(monkeypatch):
    """Every sampled position (a multiple of the stride) holds a tiny value and the rest are large,
    so the sample's bracket is wrong; the counting pass notices and radix selection decides."""
    from lib_merge.methods import task_vectors

    base = torch.zeros(LARGE, dtype=torch.float32)
    delta = rand(LARGE, seed=60).float().abs_().add_(10)
    delta[:: LARGE // task_vectors.SAMPLE_SIZE] = 1e-3
    whole_vector_selections = []
    radix = task_vectors._kth_largest
    monkeypatch.setattr(
        task_vectors, "_kth_largest", lambda m, k: whole_vector_selections.append(m.numel()) or radix(m, k)
    )
    got = get_method("ties").func(base, delta, density=0.2, lambda_=1.0, weights=None)
    _, (trimmed,) = ties_float32_ref(base, [delta], 0.2, 1.0)
    assert torch.equal(got, trimmed)
    assert whole_vector_selections == [LARGE]
