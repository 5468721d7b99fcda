"""Issue 20: once the export frees the policy's weights, nothing keeps them resident.
(At paper scale onnxscript's rewriter kept 1.5 GB of them, and the exported graph, alive.)"""

from __future__ import annotations

import gc

import pytest
import torch

from vpp_edge.export import artifact as art
from vpp_edge.export import onnx_io
from vpp_edge.export.graphs import GRAPHS
from vpp_edge.export.phases import forget_rewriter_matches
from vpp_edge.observations import sample_observations
from vpp_edge.presets import get_preset
from vpp_edge.training.models import build_policy


def _alive_on(storages: set[int]) -> int:
    """How many live tensors still use one of the storages (data pointers) ``storages``."""
    gc.collect()
    return sum(1 for o in gc.get_objects()
               if type(o) in (torch.Tensor, torch.nn.Parameter) and o.numel()
               and o.untyped_storage().data_ptr() in storages)


@pytest.mark.slow  # a TVP export (about 40 s of CPU)
def test_released_weights_are_not_kept_by_the_exporter(tmp_path):
    preset = get_preset("tiny")
    policy, tok = build_policy(preset, seed=0)  # its own: the release makes it unusable
    policy.eval()
    ref = art.reference(policy, tok, sample_observations(preset.num_views, preset.image_size, 1)[0], seed=0)
    tvp = GRAPHS["tvp"]
    inputs = tvp.inputs_for(preset)
    weights = {p.untyped_storage().data_ptr() for p in policy.parameters()}
    onnx_io.export_onnx(tvp.adapter(policy), tuple(ref[i] for i in inputs), inputs, tvp.outputs,
                        tmp_path / "tvp.onnx", 18, 0)
    art._release_weights(policy)  # gc + malloc_trim + forget_rewriter_matches
    assert _alive_on(weights) == 0
    assert forget_rewriter_matches() > 0, "the rewriter's matchers exist (so the check above meant something)"
