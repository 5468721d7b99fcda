"""Artifacts for model configurations, assembled from the graph cache of
:mod:`vpp_edge.export.graph_cache` (the one graph builder, ``vpp export``'s too).

A sweep needs one artifact per model configuration (preset after the model knobs),
but most knobs change only some graphs: more DiT steps change the unrolled sampler and
nothing else. The cache keys each graph by what it computes, so a configuration reuses
every graph a knob leaves alone; an INT8 graph is calibrated on the inputs that the
PyTorch model of its configuration computes on the calibration set.

Layout under ``root``::

    graphs/<precision>/<graph>-<key>/   the graph cache (export/graph_cache.py)
    artifacts/<config key>/             manifest.json + a folder per precision (hard links into graphs/)
    checkpoints/<preset key>/           the configuration's weights, for the PyTorch backend

Every entry is written to a temporary folder and renamed into place, so Ctrl-C never
leaves a half-written graph or artifact that a later run would trust.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from vpp_edge.export.graph_cache import GraphCache, GraphSet, sha
from vpp_edge.export.graphs import GRAPHS, reference_run
from vpp_edge.export.manifest import write_artifact_manifest
from vpp_edge.files import atomic_dir
from vpp_edge.precisions import calibrated, exported
from vpp_edge.presets import Preset
from vpp_edge.tokenizer import InstructionTokenizer
from vpp_edge.training.models.policy import VPPPolicy

from .dataset import ObservationSet
from vpp_edge.state_feeds import CALIBRATION_SEED, state_feeds
from .variants import derive_policy, variant_noise


@dataclass
class BuiltConfig:
    """An artifact folder for one model configuration and what building it cost."""

    key: str
    artifact: Path
    preset: Preset
    graph_keys: dict[str, str]  # "int8/tvp" -> cache key
    built: list[str] = field(default_factory=list)  # graphs exported/converted this time
    seconds: float = 0.0


class ArtifactBuilder:
    """Builds (or finds) the artifact of a model configuration of one trained policy."""

    def __init__(self, root: str | Path, policy: VPPPolicy, tokenizer: InstructionTokenizer,
                 calibration: ObservationSet, options: dict[str, Any], int8: dict[str, Any], source: str,
                 checkpoint: Path | None = None, status: Callable[[str], None] = lambda s: None):
        """``options``: export options (``load_options()``: opset, fp16, int8, int8_cpu
        defaults); ``int8``: ``exclude_modules``, ``exclude_nodes``, ``op_types``, ``graphs``
        and calibrator ``options`` (method-specific, see :func:`vpp_edge.export.qdq.calibrator_options`).
        ``int8_cpu`` graphs take ``op_types``, ``graphs`` and ``exclude_modules`` from
        ``options["int8_cpu"]``."""
        self.root = Path(root)
        self.base = policy.eval()
        self.tokenizer = tokenizer
        self.calibration = calibration
        self.options = options
        self.int8 = int8
        self.source = source
        self.checkpoint = checkpoint
        self.status = status
        self.graphs = GraphCache(self.root / "graphs", options, int8, status)
        with tempfile.TemporaryDirectory() as tmp:
            self._tok_sha = sha(tokenizer.save(tmp).read_bytes())
        self._variant: tuple[str, VPPPolicy, list[dict[str, torch.Tensor]]] | None = None
        # A state-taking policy (action_head.use_proprio): each observation's recorded state where
        # the data has them, else the export's seeded states (vpp_edge/state_feeds.py says which).
        feeds, self.state_note = state_feeds(policy.state_normalizer, calibration.states, calibration.sources,
                                             CALIBRATION_SEED)
        self.states = [None if f is None else torch.from_numpy(f) for f in feeds]
        if self.state_note:
            status(self.state_note)

    # ---- the configuration's model and its reference runs --------------------------------
    def variant(self, preset: Preset, count: int = 1) -> tuple[VPPPolicy, list[dict[str, torch.Tensor]]]:
        """The policy under ``preset`` and its reference runs on the first ``count``
        calibration observations (computed once, as they are needed)."""
        key = sha(preset.to_dict())
        if self._variant is None or self._variant[0] != key:
            self._variant = None  # free the previous one first
            self._variant = (key, derive_policy(self.base, preset), [])
        _, policy, refs = self._variant
        observations = self.calibration.observations()
        for k in range(len(refs), min(count, len(observations))):
            obs = observations[k]
            ids, mask = (torch.from_numpy(a) for a in self.tokenizer([obs.instruction]))
            tvp_noise, action_noise = variant_noise(self.base.make_noise(1, CALIBRATION_SEED + k), preset)
            frames = torch.from_numpy(np.ascontiguousarray(obs.frames[: preset.num_views])).unsqueeze(0)
            refs.append(reference_run(policy, ids, mask, frames, tvp_noise, action_noise, self.states[k]))
        return policy, refs[:count]

    def feeds(self, preset: Preset, name: str) -> list[dict[str, np.ndarray]]:
        """Graph ``name``'s inputs on the calibration set, under ``preset``."""
        _, refs = self.variant(preset, len(self.calibration))
        return [{i: r[i].numpy() for i in GRAPHS[name].inputs_for(preset)} for r in refs]

    # ---- artifacts -----------------------------------------------------------------------
    def build(self, preset: Preset, precisions: list[str], action_mode: str, method: str = "minmax",
              label: str = "") -> BuiltConfig:
        """The artifact of ``preset`` with ``precisions`` (fp32 always), from cached graphs."""
        start = time.perf_counter()
        reference, *derived = exported()
        precisions = [reference] + [p for p in derived if p in precisions]
        policy, refs = self.variant(preset, 1)
        graphs = self.graphs.build(policy, refs[0], precisions, lambda name: self.feeds(preset, name), method)
        sigmas = list(policy.action_head.sigmas)
        config_key = sha(preset.to_dict(), self.base.normalizer.to_dict(), self._tok_sha, action_mode, sigmas,
                         sorted(graphs.keys.items()), method if set(calibrated()) & set(precisions) else None)[:16]
        folder = self.root / "artifacts" / config_key
        if not (folder / "manifest.json").is_file():
            self.status("artifact")
            with atomic_dir(folder) as tmp:
                self._assemble(tmp, preset, graphs, sigmas, action_mode, method, label)
        return BuiltConfig(config_key, folder, preset, graphs.keys, graphs.built, time.perf_counter() - start)

    def _assemble(self, tmp: Path, preset: Preset, graphs: GraphSet, sigmas: list[float], action_mode: str,
                  method: str, label: str) -> None:
        entries = graphs.link(tmp)
        calibration = graphs.calibration(tmp, self.options, self.int8, method, list(self.calibration.sources),
                                         self.calibration.digest())
        self.tokenizer.save(tmp)
        state = self.base.state_normalizer
        write_artifact_manifest(tmp, preset=preset, normalization=self.base.normalizer.to_dict(), sigmas=sigmas,
                                action_mode=action_mode, graphs=entries, calibration=calibration,
                                source=f"{self.source}; vpp calibrate configuration: {label or 'base'}",
                                state_normalization=state.to_dict() if state else None)

    def checkpoint_for(self, preset: Preset) -> Path:
        """A checkpoint of the configuration (the PyTorch backend runs from one)."""
        if self.checkpoint is not None and preset.to_dict() == self.base.preset.to_dict():
            return self.checkpoint
        from vpp_edge.training.checkpoints import save_checkpoint

        folder = self.root / "checkpoints" / sha(preset.to_dict(), self._tok_sha, self.source)[:16]
        if not (folder / "model.safetensors").is_file():
            self.status("checkpoint")
            policy, _ = self.variant(preset)
            save_checkpoint(policy, self.tokenizer, folder, extra={"derived_by": "vpp calibrate"})
        return folder
