"""The checkpoint behind an artifact, for the PyTorch baseline the benchmarks compare with."""

from __future__ import annotations

import tempfile
from pathlib import Path


def torch_checkpoint(artifact, checkpoint: Path | None) -> Path:
    """``checkpoint`` if given; for an artifact of the untrained model (`make export` without
    CKPT) the same seeded weights, rebuilt; otherwise a ValueError asking for it."""
    if checkpoint:
        return checkpoint
    if "untrained" not in artifact.manifest.get("source", ""):
        raise ValueError("this artifact comes from a checkpoint: pass it with --checkpoint")
    from vpp_edge.training.checkpoints import save_checkpoint
    from vpp_edge.training.models import build_policy

    return save_checkpoint(*build_policy(artifact.preset, seed=0), Path(tempfile.mkdtemp()) / "ck")


def open_benchmark(ap, args):
    """Torch threads from ``--threads``, the ``--artifact`` and its baseline checkpoint
    (``--checkpoint`` or the rebuilt untrained one); a usage error when it cannot be had."""
    import torch

    from vpp_edge.runtime.artifact import Artifact

    torch.set_num_threads(args.threads)
    artifact = Artifact.open(args.artifact)
    try:
        return artifact, torch_checkpoint(artifact, args.checkpoint)
    except ValueError as exc:
        ap.error(str(exc))
