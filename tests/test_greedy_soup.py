"""Greedy soup with a deterministic synthetic scorer, and loading a scorer by name."""

import dataclasses
import json
import math

import pytest

from lib_merge.errors import CancelledError, RequestError
from lib_merge.loop.greedy_soup import GreedyStep, GreedyWalk, greedy_soup, load_scorer
from lib_merge.recipe import MergeNode, ModelRef, recipe_dict, request_from_recipe
from lib_merge.request import MergeRequest

# Each model is a point; a soup is the mean of its models' points, scored by minus its distance to
# the target (0, 0). "far" alone is the worst and drags any soup away; "near" and "opposite" cancel.
VECTORS = {"near": (1.0, 0.0), "opposite": (-1.2, 0.0), "far": (3.0, 3.0), "mild": (0.0, 1.1)}


def distance_score(soup: tuple[str, ...]) -> float:
    points = [VECTORS[name] for name in soup]
    mean = [sum(axis) / len(points) for axis in zip(*points, strict=True)]
    return -math.hypot(*mean)


class Recorder:
    """A scorer that remembers every tuple it was asked about."""

    def __init__(self, score):
        self.score = score
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, soup):
        self.calls.append(soup)
        return self.score(soup)


def table(scores: dict[tuple[str, ...], float]) -> Recorder:
    return Recorder(lambda soup: scores[soup])


def test_candidates_are_ranked_by_their_own_score_best_first():
    result = greedy_soup(["far", "opposite", "near", "mild"], Recorder(distance_score))
    assert [name for name, _ in result.ranking] == ["near", "mild", "opposite", "far"]
    assert result.ranking[0] == ("near", -1.0)
    assert result.ranking[-1] == ("far", pytest.approx(-math.hypot(3, 3)))


def test_a_helpful_candidate_is_kept_and_a_harmful_one_skipped():
    result = greedy_soup(["far", "opposite", "near"], Recorder(distance_score))
    assert result.ingredients == ("near", "opposite")
    assert [(step.candidate, step.kept) for step in result.steps] == [("opposite", True), ("far", False)]
    assert result.steps[0].score_before == -1.0
    assert result.steps[0].score_with == pytest.approx(-0.1)
    assert result.steps[1].score_before == result.steps[0].score_with
    assert result.steps[1].score_with < result.steps[1].score_before
    assert result.best_score == pytest.approx(-0.1)


def test_an_exact_tie_keeps_the_candidate():
    scores = {("a",): 1.0, ("b",): 0.5, ("a", "b"): 1.0, ("c",): 0.25, ("a", "b", "c"): 0.9999}
    result = greedy_soup(["a", "b", "c"], table(scores))
    assert result.ingredients == ("a", "b")
    assert result.steps == (GreedyStep("b", 1.0, 1.0, True), GreedyStep("c", 0.9999, 1.0, False))


def test_a_tie_in_the_ranking_keeps_the_given_order():
    scores = {("y",): 2.0, ("x",): 2.0, ("z",): 3.0, ("z", "y"): 0.0, ("z", "x"): 0.0}
    result = greedy_soup(["y", "x", "z"], table(scores))
    assert result.ranking == (("z", 3.0), ("y", 2.0), ("x", 2.0))


def test_each_distinct_tuple_is_scored_once():
    scorer = Recorder(distance_score)
    greedy_soup(["far", "opposite", "near", "mild"], scorer)
    assert len(scorer.calls) == len(set(scorer.calls)) == 2 * 4 - 1
    assert scorer.calls[:4] == [("far",), ("opposite",), ("near",), ("mild",)]
    assert scorer.calls[4:] == [("near", "mild"), ("near", "mild", "opposite"), ("near", "mild", "opposite", "far")]


def test_the_record_is_the_path_taken_and_is_json():
    scores = {
        ("far",): -4.0,
        ("near",): -1.0,
        ("opposite",): -1.2,
        ("near", "opposite"): -0.1,
        ("near", "opposite", "far"): -1.5,
    }
    record = greedy_soup(["far", "near", "opposite"], table(scores)).record()
    assert json.loads(json.dumps(record)) == record
    assert record == {
        "algorithm": "greedy_soup",
        "ranking": [
            {"model": "near", "score": -1.0},
            {"model": "opposite", "score": -1.2},
            {"model": "far", "score": -4.0},
        ],
        "steps": [
            {"candidate": "opposite", "score_with": -0.1, "score_before": -1.0, "kept": True},
            {"candidate": "far", "score_with": -1.5, "score_before": -0.1, "kept": False},
        ],
        "ingredients": ["near", "opposite"],
        "best_score": -0.1,
    }


def test_the_node_is_a_uniform_soup_of_the_ingredients():
    node = greedy_soup(["far", "opposite", "near"], Recorder(distance_score)).node()
    assert node == MergeNode("soup", (ModelRef("near"), ModelRef("opposite")))
    node.validate()


def test_a_single_ingredient_has_no_node():
    scores = {("a",): 1.0, ("b",): 0.0, ("a", "b"): 0.5}
    result = greedy_soup(["a", "b"], table(scores))
    assert result.ingredients == ("a",)
    assert result.best_score == 1.0
    assert result.node() is None


@pytest.mark.parametrize(
    ("candidates", "message"),
    [
        (["a"], r"^greedy_soup\.candidates: a soup needs at least 2 candidates, got 1"),
        ([], r"^greedy_soup\.candidates: a soup needs at least 2 candidates, got 0"),
        (["a", "b", "a"], r"^greedy_soup\.candidates\[2\]: 'a' is given twice"),
        (["a", ""], r"^greedy_soup\.candidates\[1\]: expected a model name"),
        ("ab", r"^greedy_soup\.candidates: expected a list of model names"),
    ],
)
def test_bad_candidates_are_refused_before_scoring(candidates, message):
    scorer = Recorder(lambda soup: 0.0)
    with pytest.raises(RequestError, match=message):
        greedy_soup(candidates, scorer)
    assert scorer.calls == []


def test_a_nan_score_is_refused_naming_the_candidate():
    with pytest.raises(RequestError, match=r"^scorer: NaN score for candidate 'b'"):
        greedy_soup(["a", "b"], table({("a",): 1.0, ("b",): math.nan}))
    with pytest.raises(RequestError, match=r"^scorer: NaN score for the soup a \+ b \(adding 'b'\)"):
        greedy_soup(["a", "b"], table({("a",): 1.0, ("b",): 0.0, ("a", "b"): math.nan}))


def test_a_score_that_is_no_number_is_refused():
    with pytest.raises(RequestError, match=r"^scorer: expected a number for candidate 'a', got 'good'"):
        greedy_soup(["a", "b"], table({("a",): "good", ("b",): 0.0}))


def test_should_stop_cancels_between_evaluations():
    scorer = Recorder(distance_score)
    with pytest.raises(CancelledError, match="after 3 of 5 evaluations"):
        greedy_soup(["far", "opposite", "near"], scorer, should_stop=lambda: len(scorer.calls) >= 3)
    assert len(scorer.calls) == 3


def test_should_stop_false_lets_it_finish():
    scorer = Recorder(distance_score)
    result = greedy_soup(["far", "opposite", "near"], scorer, should_stop=lambda: False)
    assert result.ingredients == ("near", "opposite")


SCORER_MODULE = """
def score(images, prompts):
    return float(len(images) + 10 * len(prompts))

class Judge:
    @staticmethod
    def score(images, prompts):
        return -1.0

THRESHOLD = 0.5
"""


@pytest.fixture
def scorer_path(tmp_path, monkeypatch):
    (tmp_path / "merge_lab_test_scorer.py").write_text(SCORER_MODULE)
    (tmp_path / "merge_lab_test_broken_scorer.py").write_text("raise RuntimeError('no GPU here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_load_scorer_imports_the_function(scorer_path):
    score = load_scorer("merge_lab_test_scorer:score")
    assert score(["img1", "img2"], ["a prompt"]) == 12.0
    assert load_scorer(" merge_lab_test_scorer : Judge.score ")([], []) == -1.0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("merge_lab_test_scorer.score", r"^scorer: expected package\.module:function, got"),
        ("merge_lab_test_scorer:", r"^scorer: expected package\.module:function"),
        (":score", r"^scorer: expected package\.module:function"),
        ("merge_lab_no_such_module:score", r"^scorer: cannot import module 'merge_lab_no_such_module' \(ModuleNotF"),
        ("merge_lab_test_broken_scorer:score", r"^scorer: cannot import .*broken_scorer' \(RuntimeError: no GPU here"),
        ("merge_lab_test_scorer:missing", r"^scorer: merge_lab_test_scorer has no attribute 'missing'"),
        ("merge_lab_test_scorer:Judge.missing", r"^scorer: merge_lab_test_scorer has no attribute 'Judge\.missing'"),
        (
            "merge_lab_test_scorer:THRESHOLD",
            r"^scorer: merge_lab_test_scorer:THRESHOLD is not callable \(it is a float",
        ),
    ],
)
def test_load_scorer_errors_name_what_is_wrong(scorer_path, spec, message):
    with pytest.raises(RequestError, match=message):
        load_scorer(spec)


# The user as the scorer: GreedyWalk, one pick at a time.


def test_the_walk_ranks_by_the_given_order_and_follows_the_picks():
    walk = GreedyWalk(["far", "near", "mild", "opposite"])
    assert walk.pending() == (("far",), ("far", "near"))
    walk = walk.decide(False)
    assert walk.pending() == (("far",), ("far", "mild"))
    walk = walk.decide(True)
    assert walk.pending() == (("far", "mild"), ("far", "mild", "opposite"))
    walk = walk.decide(True)
    assert walk.done and walk.pending() is None
    assert walk.soup() == ("far", "mild", "opposite")
    result = walk.result()
    assert result.ingredients == ("far", "mild", "opposite")
    assert [name for name, _ in result.ranking] == ["far", "near", "mild", "opposite"]
    assert [(step.candidate, step.kept) for step in result.steps] == [
        ("near", False),
        ("mild", True),
        ("opposite", True),
    ]
    assert result.node() == MergeNode("soup", (ModelRef("far"), ModelRef("mild"), ModelRef("opposite")))


def test_the_walk_record_names_the_user_and_gives_no_scores():
    record = GreedyWalk(["a", "b", "c"]).decide(True).decide(False).record()
    assert json.loads(json.dumps(record)) == record
    assert record == {
        "algorithm": "greedy_soup",
        "scorer": "user",
        "ranking": [{"model": "a", "score": None}, {"model": "b", "score": None}, {"model": "c", "score": None}],
        "steps": [
            {"candidate": "b", "score_with": None, "score_before": None, "kept": True},
            {"candidate": "c", "score_with": None, "score_before": None, "kept": False},
        ],
        "ingredients": ["a", "b"],
        "best_score": None,
    }


def test_the_walk_is_immutable_and_its_state_rebuilds_it():
    walk = GreedyWalk(["a", "b", "c"])
    later = walk.decide(True)
    assert walk.decisions == () and later.decisions == (True,)
    state = later.state()
    assert json.loads(json.dumps(state)) == state
    assert GreedyWalk(**state) == later


def test_a_walk_with_nothing_pending_refuses_a_decision():
    walk = GreedyWalk(["a", "b"]).decide(False)
    assert walk.done and walk.soup() == ("a",) and walk.result().node() is None
    with pytest.raises(RequestError, match=r"^greedy_soup\.decide: nothing is pending"):
        walk.decide(True)


@pytest.mark.parametrize(
    ("candidates", "decisions", "message"),
    [
        (["a"], (), r"^greedy_soup\.candidates: a soup needs at least 2 candidates"),
        (["a", "b", "a"], (), r"^greedy_soup\.candidates\[2\]: 'a' is given twice"),
        (["a", "b"], (True, False), r"^greedy_soup\.decisions: expected up to 1 true/false picks"),
        (["a", "b"], ("yes",), r"^greedy_soup\.decisions: expected up to 1 true/false picks"),
    ],
)
def test_a_bad_walk_is_refused(candidates, decisions, message):
    with pytest.raises(RequestError, match=message):
        GreedyWalk(candidates, decisions)


# The path in a recipe: MergeRequest.provenance, under the recipe's "greedy_soup" key.


def test_a_recipe_carries_the_path_and_reads_it_back():
    record = GreedyWalk(["a", "b"]).decide(True).record()
    request = MergeRequest(
        "a", tree=MergeNode("soup", (ModelRef("a"), ModelRef("b"))), provenance={"greedy_soup": record}
    )
    recipe = recipe_dict(request)
    assert recipe["greedy_soup"] == record and recipe["merge"] == {"method": "soup", "models": ["a", "b"]}
    assert request_from_recipe(json.loads(json.dumps(recipe))) == request
    plain = recipe_dict(dataclasses.replace(request, provenance=None))
    assert "greedy_soup" not in plain and request_from_recipe(plain).provenance is None


@pytest.mark.parametrize(
    ("provenance", "message"),
    [
        ({"sweep": {}}, r"^provenance\.sweep: unknown \(known: greedy_soup\)"),
        ({"greedy_soup": [1]}, r"^provenance\.greedy_soup: expected a mapping, got list"),
        ("greedy", r"^provenance: expected a mapping"),
    ],
)
def test_a_bad_provenance_is_refused(provenance, message):
    with pytest.raises(RequestError, match=message):
        MergeRequest("a", "b", provenance=provenance)


def test_a_recipe_with_a_bad_path_is_refused_naming_it():
    recipe = {"merge": {"method": "soup", "models": ["a", "b"]}, "greedy_soup": "kept b"}
    with pytest.raises(RequestError, match=r"^recipe\.greedy_soup: expected a mapping, got str"):
        request_from_recipe(recipe)
