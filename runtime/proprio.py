"""The robot state a policy takes (``action_head.use_proprio``), read from the bridge's
state reply.

Where the values sit is a fact of the robot, written in its description as
``runtime.policy_state``: a list of state-reply fields, each whole or sliced, concatenated
in order (the official XBot state interleaves arm pose and hand joints, for example
``["ee_pose[0:7]", "joints[0:12]", "ee_pose[7:14]", "joints[12:24]"]``). The policy's own
check (shape, finite, range against its state bounds) follows in
:meth:`vpp_edge.normalization.StateNormalizer.check`; the layout is parsed by the robot
description (:func:`vpp_edge.robot_description.parse_state_layout`). numpy only.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from vpp_edge.normalization import StateError


def state_vector(state: Any, layout: Sequence[tuple[str, slice]]) -> np.ndarray:
    """The policy's raw state from a bridge state reply; :class:`StateError` (``missing``)
    without a reply or when a slice reaches past a field the bridge sent."""
    if state is None:
        raise StateError("missing: no robot state from the bridge yet")
    pieces = []
    for name, part in layout:
        values = np.asarray(getattr(state, name), np.float64).reshape(-1)
        if part.stop is not None and part.stop > len(values):
            raise StateError(f"shape: the bridge's {name} has {len(values)} values, policy_state reads "
                             f"[{part.start or 0}:{part.stop}]")
        pieces.append(values[part])
    return np.concatenate(pieces)
