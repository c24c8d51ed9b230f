"""Choosing one candidate from the results: the Pareto front and the selection rules of DESIGN.md.

Both objectives are minimised (memorization, quality distance). The functions take plain ``Point``s so that they do
not depend on Optuna and can be checked by hand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError

RULES = ("margin", "knee", "weighted")


@dataclass(frozen=True)
class Point:
    key: object          # whatever identifies the candidate (a trial number)
    memorization: float
    quality: float


@dataclass
class Selection:
    chosen: Point
    rule: str
    explanation: str


def dominates(a: Point, b: Point) -> bool:
    return (a.memorization <= b.memorization and a.quality <= b.quality
            and (a.memorization < b.memorization or a.quality < b.quality))


def pareto_front(points: list[Point]) -> list[Point]:
    """The non-dominated points, sorted by memorization (then quality). Exact duplicates are all kept."""
    usable = [p for p in points if math.isfinite(p.memorization) and math.isfinite(p.quality)]
    front = [p for p in usable if not any(dominates(q, p) for q in usable)]
    return sorted(front, key=lambda p: (p.memorization, p.quality))


def select(points: list[Point], rule: str = "margin", margin: float = 0.1, relative: bool = True,
           weights: tuple[float, float] = (0.5, 0.5)) -> Selection | None:
    """Pick one point of the Pareto front of ``points`` by ``rule``; None when there is no usable point.

    margin: the lowest memorization among candidates whose quality is within ``margin`` of the best quality
        (relative: quality <= best * (1 + margin); absolute: quality <= best + margin).
    knee: after scaling both objectives to [0, 1] over the front, the point farthest below the line joining the
        front's two ends (the best trade-off when neither objective is preferred).
    weighted: the lowest ``w_mem * mem + w_q * quality`` on the same [0, 1] scales.
    """
    front = pareto_front(points)
    if not front:
        return None
    if rule == "margin":
        return _by_margin(front, margin, relative)
    if rule == "knee":
        return _knee(front)
    if rule == "weighted":
        return _weighted(front, weights)
    raise ConfigError(f"selection.rule '{rule}': choose one of {', '.join(RULES)}")


def _by_margin(front: list[Point], margin: float, relative: bool) -> Selection:
    if margin < 0:
        raise ConfigError(f"selection.margin must be >= 0, got {margin}")
    best_q = min(p.quality for p in front)
    limit = best_q + abs(best_q) * margin if relative else best_q + margin
    within = [p for p in front if p.quality <= limit]
    chosen = min(within, key=lambda p: (p.memorization, p.quality))
    kind = f"{margin:.0%} of" if relative else f"{margin:g} of"
    return Selection(chosen, "margin", f"lowest memorization among the {len(within)} Pareto candidates whose "
                                       f"quality is within {kind} the best ({best_q:.4g}; limit {limit:.4g})")


def _scaled(front: list[Point]) -> list[tuple[float, float]]:
    def scale(values):
        lo, hi = min(values), max(values)
        return [(v - lo) / (hi - lo) if hi > lo else 0.0 for v in values]

    return list(zip(scale([p.memorization for p in front]), scale([p.quality for p in front])))


def _knee(front: list[Point]) -> Selection:
    scaled = _scaled(front)
    if len(front) < 3:
        # No curve to bend: the point nearest the ideal corner (0, 0).
        i = min(range(len(front)), key=lambda k: math.hypot(*scaled[k]))
        return Selection(front[i], "knee", "nearest the ideal point (front of fewer than three points)")
    # Ends of the front (sorted by memorization): (0, 1) and (1, 0) after scaling; distance below the line x+y=1.
    i = max(range(len(front)), key=lambda k: (1.0 - scaled[k][0] - scaled[k][1]) / math.sqrt(2))
    return Selection(front[i], "knee", "farthest from the line joining the ends of the front (scaled objectives)")


def _weighted(front: list[Point], weights) -> Selection:
    w_mem, w_q = (float(w) for w in weights)
    if w_mem < 0 or w_q < 0 or w_mem + w_q == 0:
        raise ConfigError(f"selection.weights must be non-negative and not both zero, got {weights}")
    scaled = _scaled(front)
    i = min(range(len(front)), key=lambda k: w_mem * scaled[k][0] + w_q * scaled[k][1])
    return Selection(front[i], "weighted", f"lowest {w_mem:g} x memorization + {w_q:g} x quality "
                                           "(both scaled to [0, 1] over the front)")
