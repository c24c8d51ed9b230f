"""Choosing one candidate from the results: the Pareto front and the selection rules.

Both objectives are minimised (memorization, quality distance). The functions take plain ``Point``s so that they do
not depend on Optuna and can be checked by hand.

The default rule, ``copy_bound``, cannot be won by not training: a candidate that barely trains copies nothing,
so among the candidates that copy little it is quality that decides, and the untuned base model is one of them.
A fine-tuned candidate is chosen only when its quality beats the base model's by more than its own sampling noise;
otherwise the answer is "do not fine-tune".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError

RULES = ("copy_bound", "margin", "knee", "weighted")
DEFAULT_RULE = "copy_bound"
# tau is calibrated so that about 1% of unseen real images of the domain exceed it: a model that copies nothing
# still shows a copy rate near 1%. Five times that is a rate a copying-free model seldom exceeds by chance (binomial,
# p = 0.01: P(rate > 5%) is 2.4% at 24 samples, 3.6% at 30, 1.2% at 48, below 0.1% from 100; but 15% at 16, where
# one false copy is already 6%), and far below what a memorizing fine-tune shows (full fine-tuning of the bundled
# hospital at 500 steps: 31%).
DEFAULT_COPY_BOUND = 0.05


@dataclass(frozen=True)
class Point:
    key: object          # whatever identifies the candidate (a trial number)
    memorization: float
    quality: float
    copy_rate: float | None = None      # share of memorization samples above tau (rule copy_bound)
    quality_high: float | None = None   # upper end of the quality figure's 95% interval
    base: bool = False                  # the untuned base model (a candidate of rule copy_bound only)


@dataclass
class Selection:
    chosen: Point
    rule: str
    explanation: str

    @property
    def do_not_finetune(self) -> bool:
        """The untuned base model was chosen: no fine-tuned candidate was safe and better."""
        return self.chosen.base


def dominates(a: Point, b: Point) -> bool:
    return (a.memorization <= b.memorization and a.quality <= b.quality
            and (a.memorization < b.memorization or a.quality < b.quality))


def pareto_front(points: list[Point]) -> list[Point]:
    """The non-dominated points, sorted by memorization (then quality). Exact duplicates are all kept."""
    usable = [p for p in points if math.isfinite(p.memorization) and math.isfinite(p.quality)]
    front = [p for p in usable if not any(dominates(q, p) for q in usable)]
    return sorted(front, key=lambda p: (p.memorization, p.quality))


def select(points: list[Point], rule: str = DEFAULT_RULE, margin: float = 0.1, relative: bool = True,
           weights: tuple[float, float] = (0.5, 0.5), copy_bound: float = DEFAULT_COPY_BOUND) -> Selection | None:
    """Pick one point by ``rule``; None when there is no usable point.

    copy_bound: among the points whose copy rate is at most ``copy_bound``, the best quality; the base model (the
        point with ``base=True``) is always a candidate, whatever its copy rate, and a fine-tuned point beats it
        only when the upper end of its quality interval is below the base model's quality. Every point counts,
        not the Pareto front only: memorization (the search's objective) is not the copy rate.
    The other rules pick a point of the Pareto front of the fine-tuned points (the base model is left out):
    margin: the lowest memorization among candidates whose quality is within ``margin`` of the best quality
        (relative: quality <= best * (1 + margin); absolute: quality <= best + margin).
    knee: after scaling both objectives to [0, 1] over the front, the point farthest below the line joining the
        front's two ends (the best trade-off when neither objective is preferred).
    weighted: the lowest ``w_mem * mem + w_q * quality`` on the same [0, 1] scales.
    """
    if rule == "copy_bound":
        return _by_copy_bound(points, copy_bound)
    front = pareto_front([p for p in points if not p.base])
    if not front:
        return None
    if rule == "margin":
        return _by_margin(front, margin, relative)
    if rule == "knee":
        return _knee(front)
    if rule == "weighted":
        return _weighted(front, weights)
    raise ConfigError(f"selection.rule '{rule}': choose one of {', '.join(RULES)}")


def _by_copy_bound(points: list[Point], bound: float) -> Selection | None:
    if not 0 <= bound <= 1:
        raise ConfigError(f"selection.copy_bound must be a rate in [0, 1], got {bound}")
    usable = [p for p in points if math.isfinite(p.quality)]
    base = next((p for p in usable if p.base), None)
    safe = [p for p in usable if not p.base and p.copy_rate is not None and p.copy_rate <= bound]
    best = min(safe, key=lambda p: (p.quality, p.copy_rate, p.memorization), default=None)
    limit = f"copy rate at most {bound:.0%}"
    if best is None:
        if base is None:
            return None
        return Selection(base, "copy_bound", f"do not fine-tune: no fine-tuned candidate had a {limit} "
                                             f"({len(usable) - 1} measured)")
    high = best.quality if best.quality_high is None else best.quality_high
    if base is not None and not high < base.quality:
        return Selection(base, "copy_bound", f"do not fine-tune: the best quality among the {len(safe)} "
                                             f"fine-tuned candidate(s) with a {limit} ({best.quality:.4g}, interval "
                                             f"up to {high:.4g}) is not better than the base model's "
                                             f"({base.quality:.4g}) beyond its sampling noise")
    against = f"; better than the base model's {base.quality:.4g}" if base is not None else ""
    return Selection(best, "copy_bound", f"best quality ({best.quality:.4g}, interval up to {high:.4g}) among the "
                                         f"{len(safe)} fine-tuned candidate(s) with a {limit}{against}")


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
