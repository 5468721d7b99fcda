"""The robot state fed with each calibration or held-out observation to a policy that takes
one (``action_head.use_proprio``, the official XBot).

Where the observations' episodes recorded states of the policy's width, each observation gets
its own recorded state, normalised with the policy's state bounds as the official deployment
does (:meth:`vpp_edge.normalization.StateNormalizer.normalize`): the INT8 quantizer then sees
the states the robot will report, and the held-out parity measures the policy where it acts.
Only where the data has none (or of another width) the export's seeded states stand in
(:func:`vpp_edge.normalization.seeded_state`), and the note says so.

One rule for every path that calibrates or gates a state-taking policy: ``vpp export`` and
``vpp calibrate`` (with a PyTorch policy: its ``state_normalizer``) and OpenVINO INT8
(``export/openvino_int8.py``, torch-free, with the artifact's ``state_normalizer``). So it
takes the state normaliser, not a policy, and imports no torch: the feeds are numpy arrays,
which the PyTorch callers wrap with ``torch.from_numpy`` (no copy).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from vpp_edge.errors import DataError
from vpp_edge.normalization import StateError, StateNormalizer, seeded_state

log = logging.getLogger(__name__)

# Noise (and seeded-state) seeds of every path that runs a policy on a parity or calibration
# set (vpp export, vpp calibrate, int8_ov): observation k of the parity set uses
# PARITY_SEED + k, of the calibration set CALIBRATION_SEED + k, so their seeded states agree.
PARITY_SEED, CALIBRATION_SEED = 0, 100


def state_feeds(normalizer: StateNormalizer | None, recorded: np.ndarray | None, sources: Sequence[str],
                first_seed: int, what: str = "calibration set") -> tuple[list[np.ndarray | None], str]:
    """(one normalised state [1, P] float32 per observation, or None each where ``normalizer`` is
    None: a policy without state input; a line saying which states they are). ``normalizer``:
    the policy's (or artifact's) state bounds; ``recorded``: the raw states the observations'
    episodes recorded [N, D] (:func:`vpp_edge.observations.recorded_states`), or None;
    ``sources``: the observations' sources, one per observation. Seeded states use seed ``first_seed + k`` for
    observation k, as the export's parity does. A recorded state far outside the bounds is an
    error (:class:`DataError`): the data does not fit the policy (units, layout), and
    calibrating on clipped values would hide it."""
    if normalizer is None:
        return [None] * len(sources), ""
    dim = normalizer.dim
    if recorded is not None and recorded.shape[1] == dim:
        feeds = []
        for k, state in enumerate(recorded):
            try:
                feeds.append(normalizer.normalize(state)[None])
            except StateError as exc:
                raise DataError(f"{what}: the state recorded at {sources[k]} does not fit the policy's "
                                f"state bounds ({exc})") from None
        note = f"{what}: the episodes' recorded robot states ({dim} values), normalised with the policy's bounds"
    else:
        why = ("the data records no robot state" if recorded is None
               else f"the data records {recorded.shape[1]}-value states, the policy takes {dim}")
        feeds = [seeded_state(dim, first_seed + k) for k in range(len(sources))]
        note = f"{what}: seeded normalised robot states in [-1, 1] ({why})"
    log.info(note)
    return feeds, note


def stacked(feeds: list[np.ndarray | None]) -> np.ndarray | None:
    """The feeds as one [N, 1, P] float32 array (None for a policy without state input)."""
    present = [f for f in feeds if f is not None]
    return np.stack(present) if present else None
