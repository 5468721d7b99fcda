"""The sweep report: CSV + JSON of every point, PNG plots, a Markdown summary, and the
recommended configuration as a runtime config file (+ its artifact).

    report.csv / report.json   every point (measured, failed, skipped) with all figures
    pareto.png                 predict-step latency vs action error, frontier and pick marked
    stages.png                 per-stage latency (p50 stacked, p99 marked) of every point
    summary.md                 the answer in a page: recommendation, frontier, notes
    recommended.yaml           runtime config for `vpp run --runtime-config` (see runtime_config)
    recommended/artifact/      the recommended configuration's artifact (hard links into the cache)
"""

from __future__ import annotations

import csv
import json
import os
import platform
import shutil
from pathlib import Path
from typing import Any, Sequence

from vpp_edge import precisions
from vpp_edge.files import atomic_dir

from . import knobs as K
from .grid import SweepSpec
from .pareto import Recommendation, RecommendationError, Tolerance, latency, pareto_front, recommend
from .runtime_config import RuntimeConfig, write_runtime_config

ERROR_FLOOR = 1e-12  # errors below this are drawn at it (log axis)
STAGE_COLOURS = {"tvp": "#4C72B0", "former": "#55A868", "action_head": "#C44E52"}
PRECISION_COLOURS = {name: precisions.get(name).colour for name in precisions.names()}
BACKEND_MARKERS = {"onnxruntime": "o", "torch": "s", "tensorrt": "^", "openvino": "v"}
SPARE_COLOURS = ("#e377c2", "#7f7f7f", "#bcbd22", "#17becf")  # precisions without a colour of their own
SPARE_MARKERS = ("D", "P", "X", "h")
OPT_IN_FLAG = "--allow-input-changes"
KNOB_COLUMNS = list(K.KNOBS)
MEASURED_COLUMNS = ["total_p50_ms", "total_p99_ms", "tvp_p50_ms", "tvp_p99_ms", "former_p50_ms", "former_p99_ms",
                    "action_head_p50_ms", "action_head_p99_ms", "text_p50_ms", "text_p99_ms", "action_mse",
                    "action_max_abs", "action_cosine_min", "feature_cosine_min", "feature_cosine_mean", "peak_rss_mb",
                    "engine_rss_mb"]
FIGURE_COLUMNS = MEASURED_COLUMNS + ["latency_repeats", "load_avg", "build_s", "measure_s", "config", "artifact",
                                     "error"]


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} CPU core(s) visible, {platform.system()} {platform.machine()}"


def no_effect_notes(rows: Sequence[dict[str, Any]], base: dict[str, Any]) -> list[str]:
    """Model knob settings whose FP32 graphs are identical to the trained configuration's
    (the knob does not change what is computed)."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("graph_keys")]

    def fp32(r: dict[str, Any]) -> dict[str, str]:
        return {k: v for k, v in r["graph_keys"].items() if k.startswith("fp32/")}

    at_base = [r for r in ok if all(r[k] == base[k] for k in K.MODEL_KNOBS)]
    if not at_base:
        return []
    reference = fp32(at_base[0])
    notes = set()
    for r in ok:
        changed = {k: r[k] for k in K.MODEL_KNOBS if r[k] != base[k]}
        if changed and fp32(r) == reference:
            notes.add(", ".join(f"{k}={v}" for k, v in changed.items()))
    return sorted(notes)


def series_styles(rows: Sequence[dict[str, Any]]) -> tuple[dict[str, str], dict[str, str]]:
    """Colour per precision and marker per backend for every one that ``rows`` use, so
    each series the plot draws has its own legend entry."""
    precisions = sorted({r["precision"] for r in rows})
    backends = sorted({r["backend"] for r in rows})
    spare_c = iter(SPARE_COLOURS * (1 + len(precisions)))
    spare_m = iter(SPARE_MARKERS * (1 + len(backends)))
    colours = {p: PRECISION_COLOURS.get(p) or next(spare_c) for p in precisions}
    markers = {b: BACKEND_MARKERS.get(b) or next(spare_m) for b in backends}
    return colours, markers


def ineligible_points(rows: Sequence[dict[str, Any]], base: dict[str, Any],
                      allow_input_changes: bool = False) -> dict[str, str]:
    """Point id -> why it may not be recommended: it changes the policy's inputs (cameras,
    frames) from the trained configuration ``base``, and the user did not opt in."""
    if allow_input_changes:
        return {}
    out = {}
    for r in rows:
        changed = K.input_changes(r, base) if r.get("status") == "ok" else {}
        if changed:
            what = ", ".join(f"{k}={v}" for k, v in changed.items())
            out[r["id"]] = f"changes the policy's inputs ({what}; opt in with {OPT_IN_FLAG})"
    return out


def _is_reference(row: dict[str, Any], base: dict[str, Any]) -> bool:
    """``row`` is the trained configuration at FP32 on the default backend."""
    return row.get("status") == "ok" and all(row.get(k) == base.get(k) for k in K.KNOBS if k != "calibration")


def accuracy_trade(pick: dict[str, Any], rows: Sequence[dict[str, Any]], base: dict[str, Any],
                   objective: str) -> str:
    """One sentence: the speed the recommended point gains over the trained configuration,
    the accuracy it gives up for it (vs the FP32 reference), and any input it changes."""
    errors = (f"action MSE {pick['action_mse']:.2e}, max abs {pick['action_max_abs']:.2e}, feature cosine "
              f"{pick['feature_cosine_min']:.5f} vs the FP32 reference")
    reference = next((r for r in rows if _is_reference(r, base)), None)
    if reference is None:
        text = f"trades {errors} (the trained configuration was not measured, so no speed-up is known)"
    elif reference["id"] == pick["id"]:
        text = f"the trained configuration itself: no accuracy traded ({errors}, i.e. export round-off)"
    else:
        ref_ms, ms = latency(reference, objective), latency(pick, objective)
        text = (f"{ref_ms / ms:.2f}x the speed of the trained configuration ({reference['label']}: {ref_ms:.1f} -> "
                f"{ms:.1f} ms {objective}) for {errors} (trained configuration: action MSE "
                f"{reference['action_mse']:.2e})")
    changed = K.input_changes(pick, base)
    if changed:
        text += ("; CHANGES THE POLICY'S INPUTS: " + ", ".join(f"{k}={v} (trained: {base[k]})"
                                                             for k, v in changed.items()))
    return text


def _cell(v: Any) -> Any:
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return v


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    columns = ["id", "label", "status", *KNOB_COLUMNS, *FIGURE_COLUMNS]
    extra = sorted({k for r in rows for k in r} - set(columns) - {"graph_keys", "built", "context", "finished"})
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns + extra, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _cell(r.get(k)) for k in columns + extra})


def _place_labels(fig: Any, ax: Any, items: list[tuple[str, float, float, dict[str, Any]]]) -> None:
    """Annotate points without overlapping labels: each label takes the first of a few
    offsets (below, above, further out) whose box is free."""
    renderer = fig.canvas.get_renderer()
    taken: list[Any] = []
    below_first = [(5, -9), (5, 5), (5, -17), (5, 13), (5, -25), (5, 21), (5, -33)]
    for label, x, y, style in items:
        offsets = [(10, 6), (10, -14), *below_first[2:]] if style.get("fontweight") == "bold" else below_first
        for dx, dy in offsets:
            text = ax.annotate(label, (x, y), textcoords="offset points", xytext=(dx, dy), **style)
            box = text.get_window_extent(renderer)
            if not any(box.overlaps(b) for b in taken) or (dx, dy) == offsets[-1]:
                taken.append(box)
                break
            text.remove()


def plot_pareto(path: Path, rows: Sequence[dict[str, Any]], front: list[str], pick: dict[str, Any] | None,
                tolerance: Tolerance, objective: str, title: str, ineligible: Sequence[str] = ()) -> list[str]:
    """Latency vs action error of every measured point; returns the legend's labels (every
    series drawn has one). ``ineligible``: ids of points that may not be recommended
    (drawn hollow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = sorted((r for r in rows if r.get("status") == "ok"), key=lambda r: latency(r, objective))
    colours, markers = series_styles(ok)
    fig, ax = plt.subplots(figsize=(12, 6.5), dpi=110)
    floored = False
    for r in ok:
        x, y = latency(r, objective), max(r["action_mse"], ERROR_FLOOR)
        floored |= r["action_mse"] < ERROR_FLOOR
        colour = colours[r["precision"]]
        ax.plot([x, r["total_p99_ms"]], [y, y], color=colour, alpha=0.35, lw=1.2, zorder=1)  # p50 -> p99
        hollow = r["id"] in ineligible
        ax.scatter([x], [y], marker=markers[r["backend"]], s=46, zorder=3, linewidth=1.2 if hollow else 0.5,
                   facecolor="none" if hollow else colour, edgecolor=colour if hollow else "black")
    by_id = {r["id"]: r for r in ok}
    frontier = sorted((by_id[i] for i in front if i in by_id), key=lambda r: latency(r, objective))
    if frontier:
        xs = [latency(r, objective) for r in frontier]
        ys = [max(r["action_mse"], ERROR_FLOOR) for r in frontier]
        ax.step(xs, ys, where="post", color="black", lw=1.4, ls="-", zorder=2, label="Pareto frontier")
    if tolerance.action_mse is not None:
        ax.axhline(max(tolerance.action_mse, ERROR_FLOOR), color="#C44E52", ls="--", lw=1,
                   label=f"tolerance: action MSE <= {tolerance.action_mse:g}")
    if pick is not None:
        ax.scatter([latency(pick, objective)], [max(pick["action_mse"], ERROR_FLOOR)], marker="*", s=420,
                   facecolor="gold", edgecolor="black", linewidth=1.0, zorder=4, label=f"recommended: {pick['label']}")
    ax.set_yscale("log")
    xs_all = [latency(r, objective) for r in ok]
    if xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) > 10:
        ax.set_xscale("log")  # one slow backend would squeeze every other point into a corner
    ax.set_xlabel(f"predict step latency, {objective} (ms; thin line to p99)")
    ax.set_ylabel("action-chunk MSE vs FP32 reference (normalised units)"
                  + (f"\nvalues below {ERROR_FLOOR:g} drawn at {ERROR_FLOOR:g}" if floored else ""))
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    handles, labels = ax.get_legend_handles_labels()
    for p, c in colours.items():
        handles.append(plt.Line2D([], [], color=c, marker="o", ls="", markeredgecolor="black"))
        labels.append(f"precision {p}")
    for b, m in markers.items():
        handles.append(plt.Line2D([], [], color="grey", marker=m, ls="", markeredgecolor="black"))
        labels.append(f"backend {b}")
    if ok:
        handles.append(plt.Line2D([], [], color="grey", alpha=0.5, lw=1.2))
        labels.append(f"{objective} -> p99 latency")
    if any(r["id"] in ineligible for r in ok):
        handles.append(plt.Line2D([], [], color="grey", marker="o", ls="", markerfacecolor="none"))
        labels.append(f"changes the policy's inputs: not recommended ({OPT_IN_FLAG})")
    ax.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.canvas.draw()  # final limits and layout: label boxes are measured in them
    bold = {"fontsize": 8, "color": "black", "fontweight": "bold"}
    grey = {"fontsize": 6.5, "color": "#666666"}
    _place_labels(fig, ax, [(r["label"], latency(r, objective), max(r["action_mse"], ERROR_FLOOR), bold)
                            for r in frontier]
                  + [(r["label"], latency(r, objective), max(r["action_mse"], ERROR_FLOOR), grey)
                     for r in ok if r["id"] not in front])
    fig.savefig(path)
    plt.close(fig)
    return labels


def plot_stages(path: Path, rows: Sequence[dict[str, Any]], pick: dict[str, Any] | None, objective: str,
                title: str) -> None:
    """Stacked p50 per stage (left: the whole predict step, p99 marked; right: the stages
    after the TVP on their own scale, where the DiT-steps and action-mode knobs act)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = sorted((r for r in rows if r.get("status") == "ok"), key=lambda r: latency(r, objective), reverse=True)
    if not ok:
        return
    fig, (ax, zoom) = plt.subplots(1, 2, sharey=True, figsize=(12, 1.8 + 0.34 * len(ok)), dpi=110,
                                   gridspec_kw={"width_ratios": [3, 1.3]})
    ys = list(range(len(ok)))
    for axis, stages in ((ax, list(STAGE_COLOURS)), (zoom, ["former", "action_head"])):
        left = [0.0] * len(ok)
        for stage in stages:
            widths = [r.get(f"{stage}_p50_ms") or 0.0 for r in ok]
            axis.barh(ys, widths, left=left, color=STAGE_COLOURS[stage], label=f"{stage} p50", height=0.7)
            left = [a + b for a, b in zip(left, widths)]
        axis.grid(True, axis="x", alpha=0.25)
    ax.scatter([r["total_p99_ms"] for r in ok], ys, marker="|", s=140, color="black", label="predict step p99",
               zorder=3)
    labels = [("★ " if pick is not None and r["id"] == pick["id"] else "") + r["label"] for r in ok]
    ax.set_yticks(ys, labels, fontsize=8)
    ax.set_xlabel("ms per predict step (text encoder excluded:\nit runs once per instruction)")
    zoom.set_xlabel("ms after the TVP\n(Video Former + action head)")
    fig.suptitle(title, fontsize=10)
    handles, names = ax.get_legend_handles_labels()
    fig.legend(handles, names, fontsize=8, loc="lower center", ncol=4, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def _md_table(rows: Sequence[dict[str, Any]], objective: str) -> str:
    head = ("| point | p50 ms | p99 ms | TVP / Former / head p50 ms | action MSE | max abs | feature cos (min) "
            "| peak RSS MB |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['label']} | {r['total_p50_ms']:.1f} | {r['total_p99_ms']:.1f} | "
                     f"{r['tvp_p50_ms']:.1f} / {r['former_p50_ms']:.2f} / {r['action_head_p50_ms']:.2f} | "
                     f"{r['action_mse']:.2e} | {r['action_max_abs']:.2e} | {r['feature_cosine_min']:.5f} | "
                     f"{r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def publish_recommendation(out: Path, pick: dict[str, Any] | None, spec: SweepSpec, tolerance: Tolerance,
                           objective: str, trade: str | None = None) -> Path | None:
    """``recommended/artifact`` + ``recommended.yaml`` for ``pick`` (both removed when None);
    ``trade``: the accuracy it trades (see :func:`accuracy_trade`), kept in the file."""
    config_path, folder = out / "recommended.yaml", out / "recommended"
    if pick is None:
        config_path.unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    source = Path(pick["artifact"])
    with atomic_dir(folder) as tmp:
        shutil.copytree(source, tmp / "artifact", copy_function=_link_or_copy)
    measured = {k: pick.get(k) for k in MEASURED_COLUMNS if pick.get(k) is not None}
    config = RuntimeConfig(folder / "artifact", pick["backend"], pick["precision"], spec["measure"]["threads"], {
        "knobs": {k: pick[k] for k in KNOB_COLUMNS},
        "measured": {k: float(f"{v:.6g}") if isinstance(v, float) else v for k, v in measured.items()},
        "sweep": {"name": spec.name, "point": pick["id"], "label": pick["label"], "objective": objective,
                  "tolerance": {k: v for k, v in tolerance.__dict__.items() if v is not None},
                  "machine": machine(), **({"trade": trade} if trade else {})},
    })
    return write_runtime_config(config_path, config)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_report(out: str | Path, spec: SweepSpec, rows: Sequence[dict[str, Any]], base: dict[str, Any],
                 wall_s: float | None = None, data_note: str = "", model: str = "",
                 allow_input_changes: bool = False) -> dict[str, Any]:
    """Write every report file into ``out``; returns the JSON report. ``base``: the knob
    values of the trained configuration. Points that change the policy's inputs (cameras,
    frames) are measured and plotted but only recommended with ``allow_input_changes``.
    Raises :class:`RecommendationError` (after writing) when no point is within tolerance."""
    out = Path(out)
    rec_cfg = spec["recommend"]
    objective = rec_cfg["objective"]
    tolerance = Tolerance.from_dict(rec_cfg["tolerance"], f"{spec.source}: recommend.tolerance")
    ok = [r for r in rows if r.get("status") == "ok"]
    # Errors below the floor are float32 round-off: equal, so the faster point dominates.
    front_idx = pareto_front([(latency(r, objective), max(r["action_mse"], ERROR_FLOOR)) for r in ok])
    front = [ok[i]["id"] for i in front_idx]
    ineligible = ineligible_points(rows, base, allow_input_changes)
    rec: Recommendation = recommend(rows, tolerance, objective, ineligible)
    pick = rec.row
    trade = accuracy_trade(pick, rows, base, objective) if pick else None
    notes = no_effect_notes(rows, base)
    title = f"{spec.name}: {len(ok)} measured point(s) on {machine()}"

    write_csv(out / "report.csv", rows)
    plot_pareto(out / "pareto.png", rows, front, pick, tolerance, objective, title, list(ineligible))
    plot_stages(out / "stages.png", rows, pick, objective, f"{spec.name}: per-stage latency ({objective} bars)")
    config_path = publish_recommendation(out, pick, spec, tolerance, objective, trade)
    report = {
        "sweep": spec.name, "source": spec.source, "model": model, "machine": machine(), "objective": objective,
        "tolerance": {k: v for k, v in tolerance.__dict__.items() if v is not None},
        "wall_s": wall_s, "data": data_note,
        "counts": {s: sum(1 for r in rows if r.get("status") == s) for s in ("ok", "failed", "skipped")},
        "frontier": front, "recommended": pick["id"] if pick else None, "reason": rec.reason, "trade": trade,
        "allow_input_changes": allow_input_changes, "ineligible": ineligible,
        "runtime_config": str(config_path) if config_path else None, "no_effect": notes,
        "rejected": rec.rejected, "points": list(rows),
    }
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    (out / "summary.md").write_text(_summary(spec, rows, ok, front, rec, notes, report), encoding="utf-8")
    if pick is None:
        raise RecommendationError(f"{rec.reason} (report: {out / 'summary.md'})")
    return report


def _summary(spec: SweepSpec, rows: Sequence[dict[str, Any]], ok: list[dict[str, Any]], front: list[str],
             rec: Recommendation, notes: list[str], report: dict[str, Any]) -> str:
    objective = report["objective"]
    counts = report["counts"]
    lines = [f"# Which configuration should the robot run? Sweep `{spec.name}`", ""]
    lines += [f"- model: {report['model'] or spec['model']}", f"- machine: {report['machine']}",
              f"- points: {counts['ok']} measured, {counts['failed']} failed, {counts['skipped']} skipped"
              + (f"; sweep wall time {report['wall_s']:.0f} s" if report.get("wall_s") else ""),
              f"- held-out data: {report['data'] or 'see data/'}",
              f"- latency: {objective} of the predict step (TVP + Former + action head; the text encoder runs once "
              f"per instruction and is reported apart) over {spec['measure']['repeats']} runs after "
              f"{spec['measure']['warmup']} warm-up, {spec['measure']['threads']} thread(s)",
              "- error: action chunk vs the FP32 PyTorch model of the trained configuration on the held-out "
              "observations, same noise; MSE and max-abs in normalised action units ([-1, 1]); feature cosine: "
              "Video Former tokens (over the frames both have)",
              "- memory: peak resident set size of the measuring process (Python + numpy + backend + graphs + "
              "inference), one process per point"]
    loads = [r["load_avg"] for r in ok if r.get("load_avg") is not None]
    if loads:
        cores = os.cpu_count() or 1
        busy = max(loads) > cores
        lines.append(f"- machine load: 1-min load average {min(loads):.1f} to {max(loads):.1f} during the timed runs "
                     f"({cores} cores)" + (": other processes competed for the CPU, so latencies are pessimistic "
                                           "and differences of a few tens of percent are noise" if busy else ""))
    lines.append("")
    lines += ["## Recommendation", ""]
    if rec.row is not None:
        r = rec.row
        lines += [f"**{r['label']}**: backend `{r['backend']}`, precision `{r['precision']}`, "
                  + ", ".join(f"{k} {r[k]}" for k in K.KNOBS if k not in ("backend", "precision")), "",
                  f"- {objective} {latency(r, objective):.1f} ms (p99 {r['total_p99_ms']:.1f} ms); action MSE "
                  f"{r['action_mse']:.2e}, max abs {r['action_max_abs']:.2e}; feature cosine "
                  f"{r['feature_cosine_min']:.5f}; peak RSS {r['peak_rss_mb']:.0f} MB",
                  f"- trades: {report['trade']}",
                  f"- why: {rec.reason}; tolerance {report['tolerance']}",
                  f"- run it: `vpp run --runtime-config {report['runtime_config']}`", ""]
    else:
        lines += [f"**none**: {rec.reason}", ""]
    lines += ["## Pareto frontier (latency vs action MSE)", "", ""]
    by_id = {r["id"]: r for r in ok}
    lines += [_md_table([by_id[i] for i in front], objective), "", "![latency vs error](pareto.png)", "",
              "![per-stage latency](stages.png)", ""]
    lines += ["## Notes", ""]
    if report["ineligible"]:
        lines.append(f"- {len(report['ineligible'])} point(s) change the policy's inputs (cameras or frames: "
                     f"{', '.join(K.INPUT_KNOBS)}) and were not recommended whatever their figures; re-run with "
                     f"`{OPT_IN_FLAG}` to let them be: "
                     + ", ".join(by_id[i]["label"] for i in report["ineligible"]) + ".")
    for n in notes:
        lines.append(f"- `{n}` exports the same graphs as the trained configuration: the knob has no effect here.")
    if "untrained" in str(report["model"]):
        lines.append("- The model is untrained (random weights): errors show how much each setting perturbs the "
                     "computation, not task success. Re-run with `--checkpoint` for a trained policy.")
    for r in rows:
        if r.get("status") in ("failed", "skipped"):
            lines.append(f"- {r['status']}: {r['label']}: {r.get('error')}")
    lines += ["", "## Files", "",
              "`report.csv`/`report.json` (every point), `pareto.png`, `stages.png`, `recommended.yaml` (runtime "
              "config: `format`, `format_version`, `artifact` (relative to the file), `backend`, `precision`, "
              "`threads`, and informational `knobs`, `measured`, `sweep`), `recommended/artifact/`.", ""]
    return "\n".join(lines)
