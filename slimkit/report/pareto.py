"""Pareto frontier of measured candidates.

A candidate dominates another when it is at least as good on every objective
and strictly better on one. The frontier is the set no other candidate
dominates: the only choices worth making, whatever the trade-off.
"""

from __future__ import annotations

from collections.abc import Sequence


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """a and b are tuples of objectives to MINIMIZE."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_front(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the non-dominated points (objectives to minimize), in input order.

    Exact duplicates are all kept: neither dominates the other.
    """
    return [i for i, p in enumerate(points) if not any(dominates(q, p) for j, q in enumerate(points) if j != i)]
