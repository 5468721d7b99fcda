"""INT8 calibration from real frames and latency/accuracy sweeps (issue: calibrate/).

dataset.py (calibration / held-out sets and quantizer feeds as .npz; the observations
themselves come from vpp_edge/observations.py, the Q/DQ calibration data from export/qdq.py),
knobs.py + grid.py (what a sweep turns, sweep files), variants.py (trained weights under
reduced configurations), builder.py (artifacts from a graph cache), measure.py (one point
in its own process), sweep.py (resumable loop), pareto.py (frontier, recommendation),
report.py (CSV/JSON/PNG/Markdown), runtime_config.py (the file `vpp run` reads),
commands.py (`vpp calibrate`).
"""
