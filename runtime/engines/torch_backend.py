"""PyTorch backend: the reference. Runs the same graph adapters the export traced, on a
vpp-edge checkpoint (the artifact holds no PyTorch weights). Optional torch.compile."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vpp_edge.extras import require
from vpp_edge.graph_spec import GRAPHS

from . import ENGINES
from .base import Engine


class TorchEngine(Engine):
    backend = "torch"

    def __init__(self, *args, checkpoint: str | Path | None = None, device: str = "cpu", compile: bool = False,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.checkpoint = checkpoint
        self.device = device
        self.compile = compile
        self.policy = None  # the loaded VPPPolicy
        self._modules: dict = {}

    def load(self) -> "TorchEngine":
        torch = require("torch", "the PyTorch backend")
        from vpp_edge.training.checkpoints import load_checkpoint
        from vpp_edge.training.models.graph_modules import ADAPTERS

        if self.checkpoint is None:
            raise ValueError("the PyTorch backend needs the checkpoint the artifact was exported from (--checkpoint)")
        policy, _ = load_checkpoint(self.checkpoint, self.artifact.preset)
        self.policy = policy.to(self.device).eval()  # the graphs' modules wrap this one policy
        for name in self.graphs:
            module = ADAPTERS[name](self.policy).eval()
            self._modules[name] = torch.compile(module) if self.compile else module
        self._torch = torch
        return self

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        gdef = GRAPHS[graph]
        with torch.inference_mode():
            args = [torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device)
                    for n in gdef.inputs_for(self.policy.preset.action_head.use_proprio)]
            out = self._modules[graph](*args)
        out = out if isinstance(out, tuple) else (out,)
        return {n: t.cpu().numpy() for n, t in zip(gdef.outputs, out)}


@ENGINES.register("torch", requires="torch", default_precision="fp32", cpu=True)
def _build(artifact, precision: str, threads: int = 0, **options) -> Engine:
    if threads:  # torch's thread count is process-wide
        require("torch", "the PyTorch backend").set_num_threads(threads)
    return TorchEngine(artifact, precision, **options)
