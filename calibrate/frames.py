"""Where older callers find the observation sampler: :mod:`vpp_edge.observations` (export,
calibration and the CLI share it; it lives below all of them)."""

from vpp_edge.observations import Observation, find_episodes, sample_observations  # noqa: F401
