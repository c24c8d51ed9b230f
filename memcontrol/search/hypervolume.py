"""The hypervolume of a two-objective front: how much of the box below a reference point its points dominate.

Both objectives are minimised. It scores a whole search (bigger is better) independently of any selection rule;
the reference point must be fixed before the runs it compares (a point outside its box adds nothing). Optuna
computes hypervolumes only in private modules, hence this small exact 2-D version.
"""

from __future__ import annotations

import math


def hypervolume_2d(points, reference) -> float:
    """Area dominated by ``points`` (pairs, minimised) and bounded by ``reference``. Points not strictly better
    than the reference in both objectives, and non-finite ones, add nothing."""
    r0, r1 = (float(v) for v in reference)
    inside = sorted((float(a), float(b)) for a, b in points
                    if math.isfinite(a) and math.isfinite(b) and a < r0 and b < r1)
    area, best = 0.0, r1
    for a, b in inside:  # by the first objective: each point adds the strip its second objective improves
        if b < best:
            area += (r0 - a) * (best - b)
            best = b
    return area
