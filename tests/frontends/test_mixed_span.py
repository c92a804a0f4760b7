"""The span of a mixed plan (spec/mixed-precision.md §6): `budget.near_budget` keeps, per choice, the
candidates nearest the budget's share, a feasible problem stays feasible, and `mixed.choose` with
span=1 plans only with the two grids around the budget."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tiny_models import random_batches, tiny_text_model

from signround.adapters.frontends import mixed
from signround.adapters.hf.blocks import find_block_lists, select_layers
from signround.rounding.budget import BudgetError, Item, Option, budget_bits, near_budget, solve


def _item(name, costs, weights=10):
    return Item(name, tuple(Option(f"{name}{c}", c, 100.0 / (1 + c)) for c in costs), weights)


def test_two_nearest_grids_and_span_two() -> None:
    it = _item("a", (20, 30, 40, 80))  # 2, 3, 4, 8 bits per weight
    assert [o.cost for o in near_budget((it,), 3.5)[0].options] == [30, 40]
    assert [o.cost for o in near_budget((it,), 3.0)[0].options] == [30, 40]  # at the share: it and the next
    assert [o.cost for o in near_budget((it,), 2.9)[0].options] == [20, 30]
    assert [o.cost for o in near_budget((it,), 3.5, span=2)[0].options] == [20, 30, 40, 80]
    assert [o.cost for o in near_budget((it,), 9.0)[0].options] == [80]  # nothing above: the dearest alone


def test_fixed_items_lower_the_share_of_the_others() -> None:
    """A fixed 8-bit item of 10 weights in a 3.5 average over 20 leaves 3.0 bits per weight to the rest."""
    fixed = Item("fixed", (Option("W8", 80, 0.0),), 10)
    (kept, same) = near_budget((_item("a", (20, 30, 40, 80)), fixed), 5.5)
    assert [o.cost for o in kept.options] == [30, 40] and same is fixed


def test_an_item_above_its_share_keeps_its_cheapest_and_the_rest_pay() -> None:
    """'narrow' cannot go below 4 bits; the budget is still met by moving 'a' down to its 2-3 bit pair."""
    narrow, a = _item("narrow", (40, 80)), _item("a", (20, 30, 40, 80))
    target = 3.0  # 60 bits for 20 weights: narrow takes 40, a has 20 left (2 bits per weight)
    got = near_budget((narrow, a), target)
    assert [o.cost for o in got[0].options] == [40]
    assert [o.cost for o in got[1].options] == [20, 30]
    assert solve(got, target).cost <= 60


@st.composite
def problems(draw):
    items = []
    for i in range(draw(st.integers(1, 5))):
        weights = draw(st.integers(1, 40))
        costs = sorted(set(draw(st.lists(st.integers(0, 10 * weights), min_size=1, max_size=5))))
        items.append(Item(f"i{i}", tuple(Option(f"o{c}", c, draw(st.floats(0, 50))) for c in costs), weights))
    return items, draw(st.floats(0.1, 10)), draw(st.integers(1, 3))


@given(problems())
@settings(max_examples=200, deadline=None)
def test_cut_problem_is_feasible_when_the_whole_is_and_keeps_a_window(problem) -> None:
    items, target, span = problem
    budget = budget_bits(target, sum(it.weights for it in items))
    assume(sum(min(o.cost for o in it.options) for it in items) <= budget)  # the whole problem is feasible
    cut = near_budget(items, target, span)
    solution = solve(cut, target)  # raises BudgetError if the cut lost feasibility
    assert solution.cost <= budget
    for whole, part in zip(items, cut):
        order = sorted(whole.options, key=lambda o: o.cost)
        kept = sorted(part.options, key=lambda o: o.cost)
        assert 1 <= len(kept) <= min(len(order), 2 * span)
        first = order.index(kept[0])
        assert order[first:first + len(kept)] == kept  # a window of neighbouring grids, none skipped


def test_infeasible_stays_infeasible() -> None:
    with pytest.raises(BudgetError, match="minimum achievable is 2.0000"):
        solve(near_budget((_item("a", (20, 30)),), 1.5), 1.5)


@pytest.mark.parametrize("span", [0, -1, True, 1.5])
def test_bad_span(span) -> None:
    with pytest.raises(ValueError, match="span must be a whole number"):
        near_budget((_item("a", (20, 30)),), 2.5, span=span)


@pytest.mark.parametrize("span", [-1, 9, True, "1"])
def test_bad_request_span(span) -> None:
    with pytest.raises(ValueError, match="span must be a whole number from 0 to 8"):
        mixed.MixedRequest.of(3.0, span=span)


def _plan(model, batches, target, span):
    request = mixed.MixedRequest.of(target, ["W2G32", "W4G32", "W8G32"], span=span)
    blocks = find_block_lists(model)
    priced = mixed.price(model, blocks, select_layers(model, blocks, request.candidates[0], {}), {}, {}, request,
                         "auto_round")
    return mixed.choose(model, batches, priced, request)


def test_choose_with_span_one_plans_with_the_two_grids_around_the_budget() -> None:
    """At 5.0 bits (W4G32 4.625 and W8G32 8.625 around it) span 1 drops W2G32, which the whole search uses."""
    model = tiny_text_model("llama")
    batches = random_batches(2, 2, 16)
    whole = _plan(model, batches, 5.0, 0)
    near = _plan(model, batches, 5.0, 1)
    assert whole.span == 0 and near.span == 1 and near.summary()["span"] == 1
    assert "W2G32" in whole.summary()["layers_per_scheme"]
    assert set(near.summary()["layers_per_scheme"]) <= {"W4G32", "W8G32"}
    assert near.average_bits <= 5.0 and near.exact
    assert "1 candidate(s) on either side" in near.describe()[0] and "either side" not in whole.describe()[0]
    score = lambda p: sum(g.scores[mixed.scheme_name(g.spec)] for g in p.groups if not g.fixed)  # noqa: E731
    assert score(whole) <= score(near) * (1 + 1e-9)  # the cut search cannot beat the whole one on its own scores
