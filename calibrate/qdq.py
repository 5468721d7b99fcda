"""Where older callers find the INT8 calibration data helpers: :mod:`vpp_edge.export.qdq`
(quantisation is export's; calibration builds on it)."""

from vpp_edge.export.qdq import (CALIBRATION_FILE, CALIBRATION_FORMAT, CALIBRATOR_DEFAULTS, METHODS,  # noqa: F401
                                 RANGES_SUFFIX, activation_scales, calibrator_options, compute_ranges,
                                 write_record)
