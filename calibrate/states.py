"""The robot state fed with each calibration or held-out observation to a policy that takes
one (``action_head.use_proprio``, the official XBot).

Where the observations' episodes recorded states of the policy's width, each observation gets
its own recorded state, normalised with the policy's state bounds as the official deployment
does (:meth:`vpp_edge.normalization.StateNormalizer.normalize`): the INT8 quantizer then sees
the states the robot will report, and the held-out parity measures the policy where it acts.
Only where the data has none (or of another width) the export's seeded states stand in
(:func:`vpp_edge.normalization.seeded_state`), and the note says so.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from vpp_edge.errors import DataError
from vpp_edge.normalization import StateError, seeded_state
from vpp_edge.training.models.policy import VPPPolicy

from .dataset import ObservationSet

log = logging.getLogger(__name__)


def state_feeds(policy: VPPPolicy, observations: ObservationSet, first_seed: int,
                what: str = "calibration set") -> tuple[list[torch.Tensor | None], str]:
    """(one normalised state [1, P] float32 per observation, or None each for a policy without
    state input; a line saying which states they are). Seeded states use seed
    ``first_seed + k`` for observation k, as the export's parity does. A recorded state far
    outside the policy's bounds is an error (:class:`DataError`): the data does not fit the
    policy (units, layout), and calibrating on clipped values would hide it."""
    normalizer = policy.state_normalizer
    if normalizer is None:
        return [None] * len(observations), ""
    dim = normalizer.dim
    recorded = observations.states
    if recorded is not None and recorded.shape[1] == dim:
        feeds = []
        for k, state in enumerate(recorded):
            try:
                feeds.append(torch.from_numpy(normalizer.normalize(state))[None])
            except StateError as exc:
                raise DataError(f"{what}: the state recorded at {observations.sources[k]} does not fit the policy's "
                                f"state bounds ({exc})") from None
        note = f"{what}: the episodes' recorded robot states ({dim} values), normalised with the policy's bounds"
    else:
        why = ("the data records no robot state" if recorded is None
               else f"the data records {recorded.shape[1]}-value states, the policy takes {dim}")
        feeds = [torch.from_numpy(seeded_state(dim, first_seed + k)) for k in range(len(observations))]
        note = f"{what}: seeded normalised robot states in [-1, 1] ({why})"
    log.info(note)
    return feeds, note


def stacked(feeds: list[torch.Tensor | None]) -> np.ndarray | None:
    """The feeds as one [N, 1, P] float32 array (None for a policy without state input)."""
    present = [f.numpy() for f in feeds if f is not None]
    return np.stack(present) if present else None
