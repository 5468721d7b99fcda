"""Pareto frontier of (latency, error) and the recommendation rule.

Pure functions on plain rows (dicts of measured figures), so they are tested on known
inputs and re-run on a finished sweep with other tolerances (``vpp calibrate report``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from vpp_edge.errors import VPPError

# Tolerance keys and how each compares: upper bounds on errors, lower bounds on cosines.
UPPER = {"action_mse": "action_mse", "action_max_abs": "action_max_abs", "latency_ms": None, "memory_mb": None}
LOWER = {"feature_cosine": "feature_cosine_min", "action_cosine": "action_cosine_min"}
OBJECTIVES = ("p50", "p99")


class RecommendationError(VPPError):
    """No point meets the tolerance, or the tolerance itself is malformed."""


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points when both coordinates are minimised.

    ``p`` dominates ``q`` when it is no worse in both and better in one; identical
    points do not dominate each other (both are kept). NaN points are never on the
    front. Indices come back in increasing order of the first coordinate.
    """
    valid = [i for i, (x, y) in enumerate(points) if not (math.isnan(x) or math.isnan(y))]
    order = sorted(valid, key=lambda i: (points[i][0], points[i][1]))
    front: list[int] = []
    best_y = math.inf
    for i in order:
        x, y = points[i]
        if y < best_y:
            front.append(i)
            best_y = y
        elif front and points[front[-1]] == (x, y):
            front.append(i)  # a duplicate of a frontier point
    return front


@dataclass(frozen=True)
class Tolerance:
    """Gates a recommended point must pass; ``None`` means no gate."""

    action_mse: float | None = None
    action_max_abs: float | None = None
    feature_cosine: float | None = None
    action_cosine: float | None = None
    latency_ms: float | None = None  # budget on the objective latency
    memory_mb: float | None = None  # budget on peak RSS

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, source: str = "tolerance") -> "Tolerance":
        data = data or {}
        if not isinstance(data, dict):
            raise RecommendationError(f"{source}: must be a mapping of gate -> bound")
        allowed = sorted(set(UPPER) | set(LOWER))
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise RecommendationError(f"{source}: unknown gate(s) {unknown}; allowed: {allowed}")
        for k, v in data.items():
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise RecommendationError(f"{source}: '{k}' must be a number or null, got {v!r}")
        return cls(**{k: None if v is None else float(v) for k, v in data.items()})

    def violations(self, row: dict[str, Any], objective: str = "p50") -> list[str]:
        """Why ``row`` fails the gates (empty when it passes)."""
        out = []
        figures = {"action_mse": row.get("action_mse"), "action_max_abs": row.get("action_max_abs"),
                   "latency_ms": latency(row, objective), "memory_mb": row.get("peak_rss_mb"),
                   "feature_cosine_min": row.get("feature_cosine_min"),
                   "action_cosine_min": row.get("action_cosine_min")}
        for gate, key in UPPER.items():
            bound, value = getattr(self, gate), figures[key or gate]
            if bound is not None and (value is None or not value <= bound):
                out.append(f"{gate} {_fmt(value)} > {bound:g}")
        for gate, key in LOWER.items():
            bound, value = getattr(self, gate), figures[key]
            if bound is not None and (value is None or not value >= bound):
                out.append(f"{gate} {_fmt(value)} < {bound:g}")
        return out


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def latency(row: dict[str, Any], objective: str = "p50") -> float:
    """The latency a point is ranked by: the predict step's p50 (or p99), in ms."""
    if objective not in OBJECTIVES:
        raise RecommendationError(f"objective '{objective}' unknown; allowed: {list(OBJECTIVES)}")
    value = row.get(f"total_{objective}_ms")
    return float("nan") if value is None else float(value)


@dataclass
class Recommendation:
    row: dict[str, Any] | None
    reason: str
    passing: list[str] = field(default_factory=list)  # ids of every point within tolerance
    rejected: dict[str, list[str]] = field(default_factory=dict)  # id -> violations


def recommend(rows: Sequence[dict[str, Any]], tolerance: Tolerance, objective: str = "p50",
              ineligible: Mapping[str, str] | None = None) -> Recommendation:
    """The fastest measured point within ``tolerance``; ties go to the lower action error,
    then to the lower p99. ``row`` is None (with the reason) when no point qualifies.
    ``ineligible``: point id -> why it may not be recommended whatever its figures (it
    changes the policy's inputs); such points are rejected with that reason first."""
    measured = [r for r in rows if r.get("status") == "ok"]
    if not measured:
        return Recommendation(None, "no point was measured successfully")
    ineligible = ineligible or {}
    passing, rejected = [], {}
    for r in measured:
        why = ([ineligible[r["id"]]] if r["id"] in ineligible else []) + tolerance.violations(r, objective)
        if why:
            rejected[r["id"]] = why
        else:
            passing.append(r)
    if not passing:
        closest = min(measured, key=lambda r: (len(rejected[r["id"]]), r.get("action_mse", math.inf)))
        return Recommendation(None, f"no point is within tolerance; closest: {closest.get('label', closest['id'])} "
                                    f"({'; '.join(rejected[closest['id']])})", [], rejected)
    best = min(passing, key=lambda r: (latency(r, objective), r.get("action_mse", math.inf),
                                       latency(r, "p99")))
    return Recommendation(best, f"fastest of {len(passing)} point(s) within tolerance (by {objective} latency)",
                          [r["id"] for r in passing], rejected)
