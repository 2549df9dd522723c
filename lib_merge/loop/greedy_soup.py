"""Greedy soup (Wortsman et al. 2022, "Model soups", Algorithm 1), with the scoring left to the caller.

Rank the candidates by their own score; start the soup with the best; add each next one, in rank
order, only if the soup with it scores at least as well as without it. Scoring a soup (merging
it and judging images) is the caller's business: ``score_of`` maps a tuple of model names to a
number, and is called once per distinct tuple.

A scorer loaded with ``load_scorer`` has the signature ``score(images: list, prompts: list[str]) -> float``
(higher is better); the caller generates the images of each soup and calls it. Where the user is
the scorer, ``GreedyWalk`` takes the same path one decision (one click) at a time.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import CancelledError, RequestError, brief
from ..recipe import MergeNode, ModelRef

ALGORITHM = "greedy_soup"
USER = "user"  # the scorer's name in a record when the user picked at each step


@dataclass(frozen=True)
class GreedyStep:
    """One decision: ``candidate`` joined the soup (``kept``) iff ``score_with`` >= ``score_before``;
    both None where the user decided (GreedyWalk): a pick between two image sets is no number."""

    candidate: str
    score_with: float | None
    score_before: float | None
    kept: bool


@dataclass(frozen=True)
class GreedySoupResult:
    """The soup chosen, the path to it, and its score.

    ``ranking`` is every candidate with its own score, best first (ties in the given order);
    ``steps`` has one decision per candidate after the first of the ranking.
    """

    ingredients: tuple[str, ...]
    steps: tuple[GreedyStep, ...]
    ranking: tuple[tuple[str, float | None], ...]
    best_score: float | None

    def node(self) -> MergeNode | None:
        """The soup as a recipe node (method ``soup``, uniform weights); None for one ingredient.

        A single model is no soup: the caller then uses ``ingredients[0]`` as it is.
        """
        return soup_node(self.ingredients) if len(self.ingredients) > 1 else None

    def record(self) -> dict:
        """The path taken, JSON-serialisable, for a recipe's ``greedy_soup`` entry.

        Every score is null where the user was the scorer (GreedyWalk.record, ``"scorer": "user"``):
        the ranking is the order they listed, and each step's ``kept`` is their pick.
        """
        return {
            "algorithm": ALGORITHM,
            "ranking": [{"model": name, "score": score} for name, score in self.ranking],
            "steps": [
                {
                    "candidate": step.candidate,
                    "score_with": step.score_with,
                    "score_before": step.score_before,
                    "kept": step.kept,
                }
                for step in self.steps
            ],
            "ingredients": list(self.ingredients),
            "best_score": self.best_score,
        }


def soup_node(names: Sequence[str]) -> MergeNode:
    """The uniform soup of ``names`` (the plain mean; the first is the primary model)."""
    return MergeNode("soup", tuple(ModelRef(name) for name in names))


def greedy_soup(
    candidates: Sequence[str],
    score_of: Callable[[tuple[str, ...]], float],
    *,
    should_stop: Callable[[], bool] | None = None,
) -> GreedySoupResult:
    """Greedy soup over ``candidates`` (model names): Algorithm 1 of "Model soups", with ``>=``.

    ``score_of`` is called once per distinct tuple of names (higher is better); ``should_stop`` is
    asked before each call, and a true answer raises CancelledError. A NaN score is refused.
    """
    names = _candidates(candidates)
    scores: dict[tuple[str, ...], float] = {}

    def score(soup: tuple[str, ...], candidate: str) -> float:
        if soup not in scores:
            if should_stop is not None and should_stop():
                raise CancelledError(f"greedy soup stopped after {len(scores)} of {2 * len(names) - 1} evaluations")
            scores[soup] = _number(score_of(soup), soup, candidate)
        return scores[soup]

    alone = [(name, score((name,), name)) for name in names]
    ranking = tuple(sorted(alone, key=lambda item: -item[1]))  # stable: ties keep the given order
    soup = (ranking[0][0],)
    best = ranking[0][1]
    steps = []
    for candidate, _ in ranking[1:]:
        with_it = score((*soup, candidate), candidate)
        kept = with_it >= best
        steps.append(GreedyStep(candidate, with_it, best, kept))
        if kept:
            soup, best = (*soup, candidate), with_it
    return GreedySoupResult(soup, tuple(steps), ranking, best)


@dataclass(frozen=True)
class GreedyWalk:
    """Greedy soup with the user as the scorer, one decision at a time (a click each).

    The user lists the candidates best first: that order is the ranking (it replaces scoring each
    model alone). Each step puts the soup so far beside the soup with the next candidate, and the
    user's pick decides whether it joins. Immutable tuples of names and picks: a UI keeps
    ``state()`` between clicks and rebuilds the walk with ``GreedyWalk(**state)``.
    """

    candidates: tuple[str, ...]
    decisions: tuple[bool, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "candidates", _candidates(self.candidates))
        decisions = tuple(self.decisions)
        if len(decisions) >= len(self.candidates) or not all(isinstance(d, bool) for d in decisions):
            raise RequestError(
                f"greedy_soup.decisions: expected up to {len(self.candidates) - 1} true/false picks, got {decisions!r}"
            )
        object.__setattr__(self, "decisions", decisions)

    @property
    def done(self) -> bool:
        return len(self.decisions) == len(self.candidates) - 1

    def soup(self) -> tuple[str, ...]:
        """The soup so far: the first candidate, then each one the user added."""
        added = (name for name, add in zip(self.candidates[1:], self.decisions, strict=False) if add)
        return (self.candidates[0], *added)

    def pending(self) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
        """(soup, soup + next candidate) for the user to compare; None once every candidate is decided."""
        if self.done:
            return None
        soup = self.soup()
        return soup, (*soup, self.candidates[len(self.decisions) + 1])

    def decide(self, add: bool) -> GreedyWalk:
        """The walk after the user's pick: ``add`` the pending candidate to the soup, or keep the soup."""
        if self.done:
            raise RequestError("greedy_soup.decide: nothing is pending, every candidate is decided")
        return GreedyWalk(self.candidates, (*self.decisions, bool(add)))

    def result(self) -> GreedySoupResult:
        """The soup and the path so far, as ``greedy_soup`` reports them, with no scores (None)."""
        picks = zip(self.candidates[1:], self.decisions, strict=False)
        steps = tuple(GreedyStep(name, None, None, add) for name, add in picks)
        return GreedySoupResult(self.soup(), steps, tuple((name, None) for name in self.candidates), None)

    def record(self) -> dict:
        """The path for a recipe's ``greedy_soup`` entry, naming the user as the scorer."""
        return {**self.result().record(), "scorer": USER}

    def state(self) -> dict:
        """JSON-able: ``GreedyWalk(**walk.state()) == walk``."""
        return {"candidates": list(self.candidates), "decisions": list(self.decisions)}


def _candidates(candidates: Sequence[str]) -> tuple[str, ...]:
    where = "greedy_soup.candidates"
    if isinstance(candidates, str):
        raise RequestError(f"{where}: expected a list of model names, got the string {candidates!r}")
    names = tuple(candidates)
    if len(names) < 2:
        raise RequestError(f"{where}: a soup needs at least 2 candidates, got {len(names)}")
    seen = set()
    for index, name in enumerate(names):
        if not isinstance(name, str) or not name:
            raise RequestError(f"{where}[{index}]: expected a model name, got {name!r}")
        if name in seen:
            raise RequestError(f"{where}[{index}]: {name!r} is given twice")
        seen.add(name)
    return names


def _number(value, soup: tuple[str, ...], candidate: str) -> float:
    """The score as a float; NaN or a non-number is refused, naming the candidate being judged."""
    what = f"candidate {candidate!r}" if len(soup) == 1 else f"the soup {' + '.join(soup)} (adding {candidate!r})"
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise RequestError(f"scorer: expected a number for {what}, got {value!r}") from None
    if math.isnan(number):
        raise RequestError(f"scorer: NaN score for {what}")
    return number


def load_scorer(spec: str) -> Callable:
    """The function named by ``"package.module:function"`` (``function`` may be dotted: ``Class.method``).

    Its signature is ``score(images: list, prompts: list[str]) -> float``, higher is better; this
    only checks that it is callable. Errors are RequestErrors naming ``scorer``.
    """
    module_name, colon, attribute = str(spec).strip().partition(":")
    module_name, attribute = module_name.strip(), attribute.strip()
    if not colon or not module_name or not attribute:
        raise RequestError(f"scorer: expected package.module:function, got {spec!r}")
    try:
        target = importlib.import_module(module_name)
    except BaseException as err:  # an import runs the module's code: any error, sys.exit() too, is the scorer's
        raise RequestError(f"scorer: cannot import module {module_name!r} ({brief(err)})") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise RequestError(f"scorer: {module_name} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise RequestError(f"scorer: {module_name}:{attribute} is not callable (it is a {type(target).__name__})")
    return target
