"""Parity figures (max-abs error, cosine) and the gates that fail an export."""

from __future__ import annotations

from typing import Any

import numpy as np

from vpp_edge.errors import VPPError


class ParityError(VPPError):
    """An exported graph does not reproduce the PyTorch model within its gate."""


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """max |ref - cand| and the cosine of the flattened tensors (both in float64)."""
    a = np.asarray(reference, np.float64).ravel()
    b = np.asarray(candidate, np.float64).ravel()
    if a.shape != b.shape:
        raise ParityError(f"shape mismatch: reference {np.shape(reference)} vs candidate {np.shape(candidate)}")
    if not np.all(np.isfinite(b)):
        return {"max_abs": float("inf"), "cosine": float("nan")}
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    cosine = 1.0 if na == nb == 0 else float(a @ b / (na * nb)) if na and nb else 0.0
    return {"max_abs": float(np.max(np.abs(a - b))) if a.size else 0.0, "cosine": cosine}


def worst(stats: list[dict[str, float]]) -> dict[str, float]:
    """Worst case over samples: largest error, smallest cosine (NaN counts as failing)."""
    cos = [s["cosine"] for s in stats]
    return {"max_abs": max(s["max_abs"] for s in stats),
            "cosine": float("nan") if any(np.isnan(cos)) else min(cos)}


def passes(stat: dict[str, float], min_cosine: float | None = None, max_abs: float | None = None) -> bool:
    if min_cosine is not None and not stat["cosine"] >= min_cosine:  # NaN fails
        return False
    return max_abs is None or stat["max_abs"] <= max_abs


def action_gate(kind: str, actions: dict[str, float], gates: dict[str, float]) -> tuple[str, bool]:
    """The action chunk's gate of a precision whose spec names gate ``kind`` (fp32, fp16, int8;
    see :mod:`vpp_edge.precisions`) with the export options' ``gates``: (its text, passed)."""
    if kind == "int8":
        return (f"cosine >= {gates['int8_action_cosine']}, max-abs <= {gates['int8_action_max_abs']}",
                passes(actions, gates["int8_action_cosine"], gates["int8_action_max_abs"]))
    return f"cosine >= {gates[f'{kind}_action_cosine']}", passes(actions, gates[f"{kind}_action_cosine"])


def summary_table(report: dict[str, Any]) -> str:
    """Markdown table of every figure in a parity report."""
    lines = ["| precision | graph | output | max-abs | cosine | gate |", "| --- | --- | --- | --- | --- | --- |"]
    for precision, section in report["precisions"].items():
        for graph, outputs in section["graphs"].items():
            for output, s in outputs.items():
                lines.append(f"| {precision} | {graph} | {output} | {s['max_abs']:.3g} | {s['cosine']:.6f} | "
                             f"{s.get('gate', '')} |")
        a = section["actions"]
        lines.append(f"| {precision} | **action chunk** | actions | {a['max_abs']:.3g} | {a['cosine']:.6f} | "
                     f"{'pass' if section['passed'] else 'FAIL'} ({section['gate']}) |")
    return "\n".join(lines)
