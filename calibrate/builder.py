"""Artifacts for model configurations, assembled from a cache of graphs.

A sweep needs one artifact per model configuration (preset after the model knobs),
but most knobs change only some graphs: more DiT steps change the unrolled sampler and
nothing else. Each graph is therefore cached under a key that says what it computes:

* FP32: a *behaviour fingerprint*: the graph's adapter run on seeded probe inputs of its
  input shapes, hashed with the input specs, opset and exporter code. Two configurations
  whose graph computes the same function share one export; a knob that does not change a
  graph (for example the TVP scheduler steps with Karras sigmas, whose first noise level
  is sigma_max for every N) is recognised as such.
* every other precision (derived as :mod:`vpp_edge.export.derive` says, the same code as
  ``vpp export``): the FP32 key + its options; for a graph an INT8 precision quantises,
  also the calibration feeds (the graph's inputs on the calibration set, computed by the
  PyTorch model of that configuration) and the calibrator.

Layout under ``root``::

    graphs/<precision>/<graph>-<key>/   <graph>.onnx (+ .data), info.json (INT8: its calibration record)
    feeds/<graph>-<digest>.npz          quantizer feeds (calibrate.dataset.save_feeds)
    artifacts/<config key>/             manifest.json + a folder per precision (hard links into graphs/)
    checkpoints/<preset key>/           the configuration's weights, for the PyTorch backend

Every entry is written to a temporary folder and renamed into place, so Ctrl-C never
leaves a half-written graph that a later run would trust.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from vpp_edge import __version__, precisions
from vpp_edge.export import onnx_io, qdq
from vpp_edge.export.derive import KEPT, derive_graph, int8_settings, quantizes, record_graph, write_calibration
from vpp_edge.export.graphs import GRAPHS, reference_run
from vpp_edge.export.manifest import write_artifact_manifest
from vpp_edge.files import atomic_dir
from vpp_edge.precisions import calibrated, exported
from vpp_edge.presets import Preset
from vpp_edge.tokenizer import InstructionTokenizer
from vpp_edge.training.models.policy import VPPPolicy

from .dataset import ObservationSet, feeds_digest, save_feeds
from .variants import derive_policy, variant_noise

CALIBRATION_SEED = 100  # noise seeds of calibration observation k: 100 + k (as the export)


def _sha(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()


def _code_digest() -> str:
    """What the graphs are made by: a change in this code or these versions is a new graph."""
    from vpp_edge import graph_spec
    from vpp_edge.export import derive, graphs
    from vpp_edge.training.models import graph_modules

    code = [Path(m.__file__).read_bytes() for m in (graph_spec, graph_modules, graphs, onnx_io, derive, qdq)]
    return _sha(*code, version("torch"), version("onnx"), version("onnxruntime"), __version__)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


def graph_fingerprint(name: str, policy: VPPPolicy, ref: dict[str, torch.Tensor], opset: int, code: str = "") -> str:
    """What graph ``name`` of ``policy`` computes, as a hash: its adapter run on seeded
    probe inputs shaped like ``ref`` (a reference run), with the input specs, the opset and
    ``code`` (a digest of the exporter's code and versions)."""
    gdef = GRAPHS[name]
    gen = torch.Generator().manual_seed(1234)
    probe, specs = [], []
    for i in gdef.inputs:
        t = ref[i]
        specs.append((i, list(t.shape), str(t.dtype)))
        if t.dtype == torch.uint8:
            probe.append(torch.randint(0, 256, t.shape, generator=gen, dtype=torch.uint8))
        elif t.is_floating_point():  # positive: valid for every input, noise levels included
            probe.append(torch.rand(t.shape, generator=gen, dtype=t.dtype) + 0.1)
        else:  # token ids and masks: the real ones
            probe.append(t)
    with torch.inference_mode():
        out = gdef.adapter(policy).eval()(*probe)
    outs = out if isinstance(out, tuple) else (out,)
    return _sha(name, specs, opset, code, *[o.detach().contiguous().numpy().tobytes() for o in outs])[:20]


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
        and calibrator ``options`` (method-specific, see :func:`qdq.calibrator_options`).
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
        self._code = _code_digest()
        with tempfile.TemporaryDirectory() as tmp:
            self._tok_sha = _sha(tokenizer.save(tmp).read_bytes())
        self._variant: tuple[str, VPPPolicy, list[dict[str, torch.Tensor]]] | None = None

    # ---- the configuration's model and its reference runs --------------------------------
    def variant(self, preset: Preset, count: int = 1) -> tuple[VPPPolicy, list[dict[str, torch.Tensor]]]:
        """The policy under ``preset`` and its reference runs on the first ``count``
        calibration observations (computed once, as they are needed)."""
        key = _sha(preset.to_dict())
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
            refs.append(reference_run(policy, ids, mask, frames, tvp_noise, action_noise))
        return policy, refs[:count]

    def fingerprint(self, name: str, policy: VPPPolicy, ref: dict[str, torch.Tensor]) -> str:
        return graph_fingerprint(name, policy, ref, self.options["opset"], self._code)

    # ---- cached graphs -------------------------------------------------------------------
    def _entry(self, precision: str, name: str, key: str, make: Callable[[Path], dict[str, Any]],
               built: list[str]) -> Path:
        folder = self.root / "graphs" / precision / f"{name}-{key}"
        if (folder / "info.json").is_file():
            return folder
        self.status(f"{precision}/{name}")
        with atomic_dir(folder) as tmp:
            info = make(tmp / f"{name}.onnx")
            info["entry"] = onnx_io.graph_entry(tmp / f"{name}.onnx", tmp, precision)
            (tmp / "info.json").write_text(json.dumps(info, indent=1, default=str))
        built.append(f"{precision}/{name}")
        return folder

    def _fp32(self, name: str, policy: VPPPolicy, ref: dict, key: str, built: list[str]) -> Path:
        gdef = GRAPHS[name]

        def make(path: Path) -> dict[str, Any]:
            onnx_io.export_onnx(gdef.adapter(policy), tuple(ref[i] for i in gdef.inputs), gdef.inputs,
                                gdef.outputs, path, self.options["opset"])
            return {"graph": name, "precision": "fp32"}

        return self._entry("fp32", name, key, make, built)

    def _derived(self, precision: str, name: str, fp32: Path, key: str, preset: Preset, method: str,
                 built: list[str]) -> tuple[Path, str]:
        """Graph ``name`` of ``precision`` derived from its FP32 graph (export/derive.py), cached
        under a key of what it is derived from: the FP32 key, the precision's options and, for
        a graph it quantises, the calibration feeds and the calibrator."""
        spec = precisions.get(precision)
        feeds: list[dict[str, np.ndarray]] = []
        if spec.qdq is None:
            derived_key = _sha(key, precision, list(self.options["fp16"]["keep_fp32_ops"]))[:20]
        elif not quantizes(precision, name, self.options, self.int8):
            if not spec.qdq.ort_fusions:  # kept in float as it is: the FP32 graph itself
                return fp32, key
            derived_key = _sha(key, precision, "kept")[:20]
        else:
            _, refs = self.variant(preset, len(self.calibration))
            feeds = [{i: r[i].numpy() for i in GRAPHS[name].inputs} for r in refs]
            s = self.int8_settings(precision)
            derived_key = _sha(key, feeds_digest(feeds), method, qdq.calibrator_options(method, s.get("options")),
                               s["op_types"], s["exclude_modules"], s.get("exclude_nodes", []),
                               dataclasses.asdict(spec.qdq))[:20]

        def make(path: Path) -> dict[str, Any]:
            ranges = path.with_name(f"{name}{qdq.RANGES_SUFFIX}") if feeds else None
            info = derive_graph(precision, name, fp32 / f"{name}.onnx", path, self.options, self.int8, feeds, method,
                                ranges)
            if feeds:
                digest = feeds_digest(feeds)
                feed_file = save_feeds(self.root / "feeds" / f"{name}-{digest[:20]}.npz", feeds)
                info.update(method=method, feeds=str(feed_file.relative_to(self.root)), feeds_sha256=digest)
            if spec.calibrated:
                info["record"] = record_graph(info, path)
            return {"graph": name, "precision": precision, **info}

        return self._entry(precision, name, derived_key, make, built), derived_key

    def int8_settings(self, precision: str) -> dict[str, Any]:
        """Quantizer settings of a Q/DQ ``precision``."""
        return int8_settings(self.int8, self.options, precision)

    # ---- artifacts -----------------------------------------------------------------------
    def build(self, preset: Preset, precisions: list[str], action_mode: str, method: str = "minmax",
              label: str = "") -> BuiltConfig:
        """The artifact of ``preset`` with ``precisions`` (fp32 always), from cached graphs."""
        start = time.perf_counter()
        reference, *derived = exported()
        precisions = [reference] + [p for p in derived if p in precisions]
        policy, refs = self.variant(preset, 1)
        built: list[str] = []
        entries: dict[str, Path] = {}
        keys: dict[str, str] = {}
        for name in GRAPHS:
            key = self.fingerprint(name, policy, refs[0])
            entries[f"{reference}/{name}"] = fp32 = self._fp32(name, policy, refs[0], key, built)
            keys[f"{reference}/{name}"] = key
            for p in precisions[1:]:
                entries[f"{p}/{name}"], keys[f"{p}/{name}"] = self._derived(p, name, fp32, key, preset, method, built)
        sigmas = list(policy.action_head.sigmas)
        config_key = _sha(preset.to_dict(), self.base.normalizer.to_dict(), self._tok_sha, action_mode, sigmas,
                          sorted(keys.items()), method if set(calibrated()) & set(precisions) else None)[:16]
        folder = self.root / "artifacts" / config_key
        if not (folder / "manifest.json").is_file():
            self.status("artifact")
            with atomic_dir(folder) as tmp:
                self._assemble(tmp, preset, precisions, entries, sigmas, action_mode, method, label)
        return BuiltConfig(config_key, folder, preset, keys, built, time.perf_counter() - start)

    def _assemble(self, tmp: Path, preset: Preset, precisions: list[str], entries: dict[str, Path],
                  sigmas: list[float], action_mode: str, method: str, label: str) -> None:
        graphs: dict[str, Any] = {}
        records: dict[str, dict[str, Any]] = {p: {} for p in calibrated() if p in precisions}
        for key, entry in entries.items():
            precision, name = key.split("/")
            (tmp / precision).mkdir(exist_ok=True)
            info = json.loads((entry / "info.json").read_text())
            for f in entry.iterdir():
                if f.suffix in (".onnx", ".data") or f.name.endswith(qdq.RANGES_SUFFIX):
                    _link_or_copy(f, tmp / precision / f.name)
            g = dict(info["entry"], precision=precision, file=f"{precision}/{info['entry']['file']}")
            g["external_data"] = [dict(x, file=f"{precision}/{x['file']}") for x in g["external_data"]]
            graphs[key] = g
            if precision in records:  # a graph kept as the FP32 one has no record of its own
                records[precision][name] = info.get("record", dict(KEPT))
        calibration = {p: write_calibration(tmp / p, p, self.options, self.int8, method, graph_records,
                                            list(self.calibration.sources), self.calibration.digest())
                       for p, graph_records in records.items()}
        self.tokenizer.save(tmp)
        state = self.base.state_normalizer
        write_artifact_manifest(tmp, preset=preset, normalization=self.base.normalizer.to_dict(), sigmas=sigmas,
                                action_mode=action_mode, graphs=graphs, calibration=calibration,
                                source=f"{self.source}; vpp calibrate configuration: {label or 'base'}",
                                state_normalization=state.to_dict() if state else None)

    def checkpoint_for(self, preset: Preset) -> Path:
        """A checkpoint of the configuration (the PyTorch backend runs from one)."""
        if self.checkpoint is not None and preset.to_dict() == self.base.preset.to_dict():
            return self.checkpoint
        from vpp_edge.training.checkpoints import save_checkpoint

        folder = self.root / "checkpoints" / _sha(preset.to_dict(), self._tok_sha, self.source)[:16]
        if not (folder / "model.safetensors").is_file():
            self.status("checkpoint")
            policy, _ = self.variant(preset)
            save_checkpoint(policy, self.tokenizer, folder, extra={"derived_by": "vpp calibrate"})
        return folder
