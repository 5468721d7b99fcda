"""INT8 calibration from real frames and latency/accuracy sweeps (issue: calibrate/).

frames.py (observations from real episodes), dataset.py (calibration / held-out sets and
quantizer feeds as .npz), qdq.py (calibration ranges, QDQ scales, calibration record),
knobs.py + grid.py (what a sweep turns, sweep files), variants.py (trained weights under
reduced configurations), builder.py (artifacts from a graph cache), measure.py (one point
in its own process), sweep.py (resumable loop), pareto.py (frontier, recommendation),
report.py (CSV/JSON/PNG/Markdown), runtime_config.py (the file `vpp run` reads),
commands.py (`vpp calibrate`).
"""
