"""The bit-budget solver (rounding/budget.py): feasibility, optimality against brute force, errors."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from signround.rounding.budget import BudgetError, Item, Option, budget_bits, solve

SETTINGS = settings(max_examples=150, deadline=None)


@st.composite
def problems(draw, max_items: int = 5, max_options: int = 4):
    """Small instances: a few items with integer costs and float losses, and a target average."""
    n = draw(st.integers(1, max_items))
    items = []
    for i in range(n):
        k = draw(st.integers(1, max_options))
        weights = draw(st.integers(1, 50))
        options = tuple(Option(f"o{j}", draw(st.integers(0, 400)),
                               draw(st.floats(0, 100, allow_nan=False, allow_infinity=False)))
                        for j in range(k))
        items.append(Item(f"i{i}", options, weights))
    target = draw(st.floats(0.05, 12, allow_nan=False))
    return items, target


def brute_force(items, budget):
    """(min loss, min cost at that loss) over all choices within budget, or None. Losses count as equal
    only within float summation error (a loss lower by 1e-9 is lower: the solver is exact)."""
    best = None
    for choice in itertools.product(*(it.options for it in items)):
        cost = sum(o.cost for o in choice)
        if cost > budget:
            continue
        loss = sum(o.loss for o in choice)
        tie = best is not None and math.isclose(loss, best[0], rel_tol=1e-12, abs_tol=1e-12)
        if best is None or (loss < best[0] and not tie) or (tie and cost < best[1]):
            best = (loss, cost)
    return best


def _pick(items, solution):
    return [next(o for o in it.options if o.name == name) for it, name in zip(items, solution.choice)]


@given(problems())
@SETTINGS
def test_budget_never_exceeded_and_optimal(problem) -> None:
    items, target = problem
    weights = sum(it.weights for it in items)
    budget = budget_bits(target, weights)
    expected = brute_force(items, budget)
    assume(expected is not None)  # infeasible instances: the next test
    s = solve(items, target)
    chosen = _pick(items, s)
    assert s.cost == sum(o.cost for o in chosen) <= budget
    assert s.average_bits == s.cost / weights <= target + 1e-9
    assert s.exact and s.gap == 0.0
    assert math.isclose(s.loss, sum(o.loss for o in chosen), rel_tol=1e-9, abs_tol=1e-9)
    assert math.isclose(s.loss, expected[0], rel_tol=1e-9, abs_tol=1e-9)
    assert s.cost == expected[1]  # among plans of equal loss, the cheapest


@given(problems())
@SETTINGS
def test_infeasible_budget_names_minimum(problem) -> None:
    items, target = problem
    weights = sum(it.weights for it in items)
    cheapest = sum(min(o.cost for o in it.options) for it in items)
    assume(cheapest > budget_bits(target, weights))
    with pytest.raises(BudgetError, match="minimum achievable is") as err:
        solve(items, target)
    assert f"{cheapest / weights:.4f} bits per weight" in str(err.value)


@given(problems(max_items=9, max_options=4))
@settings(max_examples=40, deadline=None)
def test_node_limit_reports_inexact_with_a_feasible_plan(problem) -> None:
    """A search cut short still returns a plan within budget, says it is not proven, and its gap
    bounds the distance to the optimum."""
    items, target = problem
    weights = sum(it.weights for it in items)
    budget = budget_bits(target, weights)
    assume(sum(min(o.cost for o in it.options) for it in items) <= budget)
    full = solve(items, target)
    cut = solve(items, target, node_limit=1)
    assert cut.cost <= budget
    assert full.exact
    assert cut.loss >= full.loss - 1e-9
    if not cut.exact:
        assert cut.loss - cut.gap <= full.loss + 1e-9


def test_worked_example_spends_bits_where_they_save_most() -> None:
    # a: 4.0 -> 1.0 for 10 more bits; b: 2.0 -> 1.5 for 10 more. One upgrade fits: a's.
    a = Item("a", (Option("W2", 10, 4.0), Option("W4", 20, 1.0)), weights=5)
    b = Item("b", (Option("W2", 10, 2.0), Option("W4", 20, 1.5)), weights=5)
    assert solve((a, b), 3.0).choice == ("W4", "W2")
    assert solve((a, b), 4.0).choice == ("W4", "W4")
    assert solve((a, b), 2.0).choice == ("W2", "W2")


def test_relaxation_gap_is_closed() -> None:
    """The greedy (best loss per bit) answer is wrong here; the search finds the optimum."""
    items = [Item("big", (Option("lo", 0, 10.0), Option("hi", 10, 0.0)), 1),
             Item("s1", (Option("lo", 0, 6.0), Option("hi", 6, 0.0)), 1),
             Item("s2", (Option("lo", 0, 5.9), Option("hi", 5, 0.0)), 1)]
    s = solve(items, 11.0)  # budget 33 bits... over 3 weights: 11 bits each
    assert s.choice == ("hi", "hi", "hi")
    s = solve(items, 11 / 3)  # 11 bits in all: big (10) alone, or s1+s2 (11) saving 11.9 > 10
    assert s.choice == ("lo", "hi", "hi") and s.exact


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(items=[], target_bits=3.0), "no items"),
    (dict(items=[Item("a", (Option("x", 1, 0.0),), 1)], target_bits=0.0), "positive number"),
    (dict(items=[Item("a", (Option("x", 1, 0.0),), 0)], target_bits=3.0), "no weights"),
])
def test_bad_problems(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        solve(**kwargs)


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="non-negative integer"):
        Option("x", 2.5, 0.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="finite"):
        Option("x", 2, math.nan)
    with pytest.raises(ValueError, match="no option"):
        Item("a", ())


def test_budget_bits_tolerates_float_products() -> None:
    assert budget_bits(3.0, 10) == 30
    assert budget_bits(0.1 * 3, 10) == 3  # 0.30000000000000004 * 10
    assert budget_bits(2.5, 3) == 7
