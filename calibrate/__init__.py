"""INT8 calibration from real frames and latency/accuracy sweeps (issue: calibrate/)."""
