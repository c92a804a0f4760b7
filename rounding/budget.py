"""Mixed precision at a bit budget: the multiple-choice knapsack, pure.

Each `Item` (a layer, or a group of layers that must share one scheme) has `Option`s: a cost in
stored bits (an integer, counted exactly by the caller) and an estimated loss. `solve` picks one
option per item so that the total cost stays within `target_bits × weights` and the summed loss is
lowest. The solver is exact: branch and bound whose bound is the linear relaxation (the Lagrangian
dual of the budget constraint, computed greedily on each item's lower convex hull). A node limit
keeps it bounded; a search that reaches it returns the best plan found with `exact=False` and the
proven gap, never silently.

    >>> a = Item("a", (Option("W2", 10, 4.0), Option("W4", 20, 1.0)), weights=5)
    >>> b = Item("b", (Option("W2", 10, 2.0), Option("W4", 20, 1.5)), weights=5)
    >>> s = solve((a, b), target_bits=3.0)
    >>> s.choice, s.cost, s.average_bits, s.exact
    (('W4', 'W2'), 30, 3.0, True)
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import attrs

#: branch-and-bound nodes visited before `solve` stops with the best plan found (exact=False)
DEFAULT_NODE_LIMIT = 200_000


@attrs.frozen
class Option:
    """One scheme for an item: its name, stored bits, estimated loss (lower is better)."""

    name: str
    cost: int
    loss: float

    def __attrs_post_init__(self) -> None:
        if isinstance(self.cost, bool) or not isinstance(self.cost, int) or self.cost < 0:
            raise ValueError(f"Option {self.name!r}: cost must be a non-negative integer (bits), got {self.cost!r}")
        if not math.isfinite(self.loss):
            raise ValueError(f"Option {self.name!r}: loss must be finite, got {self.loss!r}")


@attrs.frozen
class Item:
    """What takes one option: a name, its options (at least one), and how many weights it holds
    (the denominator of the average)."""

    name: str
    options: tuple[Option, ...] = attrs.field(converter=tuple)
    weights: int = 0

    def __attrs_post_init__(self) -> None:
        if not self.options:
            raise ValueError(f"item {self.name!r} has no option to choose from")
        if isinstance(self.weights, bool) or not isinstance(self.weights, int) or self.weights < 0:
            raise ValueError(f"item {self.name!r}: weights must be a non-negative integer, got {self.weights!r}")


@attrs.frozen
class Solution:
    """The option chosen per item (names, in the items' order), total cost and loss, the average
    bits per weight, whether optimality is proven, and the gap to the best bound (0 when exact)."""

    choice: tuple[str, ...]
    cost: int
    loss: float
    average_bits: float
    budget: int
    exact: bool
    gap: float = 0.0
    nodes: int = 0


class BudgetError(ValueError):
    """A budget no choice meets."""


def budget_bits(target_bits: float, weights: int) -> int:
    """The total stored bits a target average allows (rounded down, with a tolerance for the
    float product: 3.0 × 10 is 30, not 29)."""
    return math.floor(target_bits * weights + 1e-9 * max(1.0, target_bits * weights))


def near_budget(items: Sequence[Item], target_bits: float, span: int = 1) -> tuple[Item, ...]:
    """The items with each choice's options cut to the `span` cheapest ones above the budget's share
    and the `span` dearest ones at or below it: a trust region for a local loss estimate (no layer
    strays more than `span` grids from the average it shares).

    The share is what the budget leaves per weight to the items that choose: ⌊target × Σ weights⌋
    minus the single-option items' cost, over the choosing items' weights. An item whose every
    option costs more than its share keeps its `span` cheapest and the share of the others is
    computed again without it, so a feasible problem stays feasible.

    >>> it = Item("a", (Option("W2", 20, 9.0), Option("W3", 30, 3.0), Option("W4", 40, 1.0), Option("W8", 80, 0.0)), 10)
    >>> [o.name for o in near_budget((it,), 3.5)[0].options], [o.name for o in near_budget((it,), 3.5, span=2)[0].options]
    (['W3', 'W4'], ['W2', 'W3', 'W4', 'W8'])
    """
    if isinstance(span, bool) or not isinstance(span, int) or span < 1:
        raise ValueError(f"span must be a whole number of candidates >= 1 on each side of the budget, got {span!r}")
    items = tuple(items)
    weights = sum(it.weights for it in items)
    if weights <= 0:
        return items
    left = budget_bits(target_bits, weights) - sum(it.options[0].cost for it in items if len(it.options) == 1)
    over: set[int] = set()  # items whose cheapest option is above the share: they take it out of the budget
    while True:
        rest = [i for i, it in enumerate(items) if len(it.options) > 1 and i not in over]
        rest_weights = sum(items[i].weights for i in rest)
        if rest_weights <= 0:
            break
        share = (left - sum(min(o.cost for o in items[i].options) for i in over)) / rest_weights
        more = {i for i in rest if min(o.cost for o in items[i].options) > share * items[i].weights}
        if not more:
            break
        over |= more
    out = []
    for i, it in enumerate(items):
        if len(it.options) == 1:
            out.append(it)
            continue
        order = sorted(it.options, key=lambda o: o.cost)
        if i in over or rest_weights <= 0:
            keep = order[:span]
        else:
            below = [o for o in order if o.cost <= share * it.weights]
            keep = [*below[-span:], *[o for o in order if o.cost > share * it.weights][:span]]
        kept = {id(o) for o in keep}
        out.append(attrs.evolve(it, options=tuple(o for o in it.options if id(o) in kept)))
    return tuple(out)


def _frontier(item: Item) -> list[int]:
    """Indices of the item's options that are not dominated (cost ascending, loss strictly
    descending); among equal (cost, loss) the first given."""
    order = sorted(range(len(item.options)), key=lambda j: (item.options[j].cost, item.options[j].loss, j))
    out: list[int] = []
    for j in order:
        if not out or item.options[j].loss < item.options[out[-1]].loss:
            if out and item.options[j].cost == item.options[out[-1]].cost:
                out[-1] = j  # same cost, lower loss: the earlier one is dominated
            else:
                out.append(j)
    return out


def _hull(item: Item, frontier: list[int]) -> list[int]:
    """The lower convex hull of the frontier (cost, loss): the options the linear relaxation uses."""
    hull: list[int] = []
    for j in frontier:
        c, l = item.options[j].cost, item.options[j].loss
        while len(hull) >= 2:
            c1, l1 = item.options[hull[-2]].cost, item.options[hull[-2]].loss
            c2, l2 = item.options[hull[-1]].cost, item.options[hull[-1]].loss
            # drop hull[-1] when it lies on or above the segment hull[-2] -> j
            if (l2 - l1) * (c - c1) >= (l - l1) * (c2 - c1):
                hull.pop()
            else:
                break
        hull.append(j)
    return hull


@attrs.frozen
class _Upgrade:
    item: int
    frm: int
    to: int
    dcost: int
    dloss: float  # negative: the loss goes down

    @property
    def rate(self) -> float:
        return -self.dloss / self.dcost


def _relaxation(items: Sequence[Item], hulls: Sequence[list[int]], upgrades: Sequence[_Upgrade],
                free: Sequence[bool], budget: int) -> tuple[float, list[int], int | None]:
    """Linear relaxation over the free items with `budget` bits: (bound, integer choice of the
    greedy prefix, the item left fractional or None). Upgrades are sorted by rate, best first."""
    pick = [hull[0] if free[i] else -1 for i, hull in enumerate(hulls)]
    loss = sum(items[i].options[pick[i]].loss for i in range(len(items)) if free[i])
    left = budget - sum(items[i].options[pick[i]].cost for i in range(len(items)) if free[i])
    if left < 0:
        return math.inf, pick, None
    for u in upgrades:
        if not free[u.item] or pick[u.item] != u.frm:
            continue
        if u.dcost <= left:
            pick[u.item] = u.to
            left -= u.dcost
            loss += u.dloss
        else:
            return loss + u.dloss * left / u.dcost, pick, u.item
    return loss, pick, None


def _fill(items: Sequence[Item], frontiers: Sequence[list[int]], pick: list[int], left: int) -> tuple[list[int], int]:
    """Greedy repair of an integer choice: spend the bits left on the upgrade (any frontier
    option) with the best loss saved per bit, until none fits."""
    pick = list(pick)
    while True:
        best = None
        for i, front in enumerate(frontiers):
            cur = items[i].options[pick[i]]
            for j in front:
                o = items[i].options[j]
                if o.cost > cur.cost and o.loss < cur.loss and o.cost - cur.cost <= left:
                    rate = (cur.loss - o.loss) / (o.cost - cur.cost)
                    if best is None or rate > best[0]:
                        best = (rate, i, j)
        if best is None:
            return pick, left
        _, i, j = best
        left -= items[i].options[j].cost - items[i].options[pick[i]].cost
        pick[i] = j


def solve(items: Sequence[Item], target_bits: float, *, node_limit: int = DEFAULT_NODE_LIMIT) -> Solution:
    """The choice of one option per item with total cost ≤ `budget_bits(target_bits, Σ weights)`
    and the lowest summed loss; among plans of equal loss, the cheaper.

    Raises BudgetError naming the minimum achievable average when no choice fits, and ValueError
    for an empty problem or a non-positive target."""
    items = tuple(items)
    if not items:
        raise ValueError("nothing to choose: the budget problem has no items (no layer to quantize)")
    if not (isinstance(target_bits, (int, float)) and math.isfinite(target_bits) and target_bits > 0):
        raise ValueError(f"target_bits must be a positive number of bits per weight, got {target_bits!r}")
    weights = sum(it.weights for it in items)
    if weights <= 0:
        raise ValueError("the items hold no weights, so an average bits per weight is undefined")
    budget = budget_bits(target_bits, weights)
    frontiers = [_frontier(it) for it in items]
    cheapest = sum(it.options[f[0]].cost for it, f in zip(items, frontiers))
    if cheapest > budget:
        richest = sum(max(o.cost for o in it.options) for it in items)
        raise BudgetError(f"target_bits {target_bits} cannot be met: the minimum achievable is "
                          f"{cheapest / weights:.4f} bits per weight (every layer at its cheapest candidate; the "
                          f"most is {richest / weights:.4f}); raise target_bits to at least "
                          f"{math.ceil(cheapest / weights * 1e4) / 1e4} or add a cheaper candidate")
    hulls = [_hull(it, f) for it, f in zip(items, frontiers)]
    upgrades = sorted((_Upgrade(i, h[k], h[k + 1], items[i].options[h[k + 1]].cost - items[i].options[h[k]].cost,
                                items[i].options[h[k + 1]].loss - items[i].options[h[k]].loss)
                       for i, h in enumerate(hulls) for k in range(len(h) - 1)),
                      key=lambda u: (-u.rate, u.item, u.to))
    root_bound, pick, _ = _relaxation(items, hulls, upgrades, [True] * len(items), budget)
    used = sum(items[i].options[j].cost for i, j in enumerate(pick))
    incumbent, _ = _fill(items, frontiers, pick, budget - used)

    def value(choice: Sequence[int]) -> tuple[float, int]:
        return (sum(items[i].options[j].loss for i, j in enumerate(choice)),
                sum(items[i].options[j].cost for i, j in enumerate(choice)))

    best_loss, best_cost = value(incumbent)
    best = list(incumbent)
    # Branch on items in decreasing loss spread: the decisions that matter most come first.
    order = sorted(range(len(items)), key=lambda i: -(items[i].options[frontiers[i][0]].loss
                                                      - items[i].options[frontiers[i][-1]].loss))
    min_rest = [0] * (len(items) + 1)  # cheapest cost of the items after position k
    for k in range(len(items) - 1, -1, -1):
        i = order[k]
        min_rest[k] = min_rest[k + 1] + items[i].options[frontiers[i][0]].cost
    free = [True] * len(items)
    chosen = [-1] * len(items)
    nodes = 0
    stopped = False
    eps = 1e-12

    def visit(k: int, fixed_loss: float, left: int) -> None:
        nonlocal best_loss, best_cost, best, nodes, stopped
        if stopped:
            return
        nodes += 1
        if nodes > node_limit:
            stopped = True
            return
        if k == len(items):
            cost = budget - left
            if fixed_loss < best_loss - eps * max(1.0, abs(best_loss)) or (
                    abs(fixed_loss - best_loss) <= eps * max(1.0, abs(best_loss)) and cost < best_cost):
                best_loss, best_cost, best = fixed_loss, cost, list(chosen)
            return
        bound, _, _ = _relaxation(items, hulls, upgrades, free, left)
        if fixed_loss + bound > best_loss + eps * max(1.0, abs(best_loss)):
            return
        i = order[k]
        free[i] = False
        # cheapest first among equal losses; lowest loss first otherwise (finds good plans early)
        for j in sorted(frontiers[i], key=lambda j: (items[i].options[j].loss, items[i].options[j].cost)):
            o = items[i].options[j]
            if o.cost + min_rest[k + 1] > left:
                continue
            chosen[i] = j
            visit(k + 1, fixed_loss + o.loss, left - o.cost)
            if stopped:
                break
        chosen[i] = -1
        free[i] = True

    if len(items) < sys.getrecursionlimit() - 100:  # one frame per item
        visit(0, 0.0, budget)
    else:
        stopped = True
    lower = root_bound if stopped else best_loss
    return Solution(choice=tuple(items[i].options[j].name for i, j in enumerate(best)), cost=best_cost,
                    loss=best_loss, average_bits=best_cost / weights, budget=budget, exact=not stopped,
                    gap=max(0.0, best_loss - lower), nodes=nodes)
