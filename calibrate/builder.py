"""Artifacts for model configurations, assembled from a cache of graphs.

A sweep needs one artifact per model configuration (preset after the model knobs),
but most knobs change only some graphs: more DiT steps change the unrolled sampler and
nothing else. Each graph is therefore cached under a key that says what it computes:

* FP32: a *behaviour fingerprint*: the graph's adapter run on seeded probe inputs of its
  input shapes, hashed with the input specs, opset and exporter code. Two configurations
  whose graph computes the same function share one export; a knob that does not change a
  graph (for example the TVP scheduler steps with Karras sigmas, whose first noise level
  is sigma_max for every N) is recognised as such.
* FP16: the FP32 key + the ops kept in FP32.
* INT8: the FP32 key + the calibration feeds (the graph's inputs on the calibration
  set, computed by the PyTorch model of that configuration) + the quantizer options.

Layout under ``root``::

    graphs/<precision>/<graph>-<key>/   <graph>.onnx (+ .data), info.json, scales.json (INT8)
    feeds/<graph>-<digest>.npz          quantizer feeds (calibrate.dataset.save_feeds)
    artifacts/<config key>/             manifest.json + fp32/ fp16/ int8/ int8_cpu/ (hard links into graphs/)
    checkpoints/<preset key>/           the configuration's weights, for the PyTorch backend

Every entry is written to a temporary folder and renamed into place, so Ctrl-C never
leaves a half-written graph that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from vpp_edge import __version__
from vpp_edge.export import onnx_io
from vpp_edge.export.artifact import int8_settings
from vpp_edge.export.graphs import GRAPHS, reference_run
from vpp_edge.export.manifest import (FORMAT_NAME, FORMAT_VERSION, INT8_PRECISIONS, PRECISIONS, tokenizer_entry,
                                      write_manifest)
from vpp_edge.files import atomic_dir
from vpp_edge.presets import Preset
from vpp_edge.tokenizer import InstructionTokenizer
from vpp_edge.training.models.policy import VPPPolicy

from . import qdq
from .dataset import ObservationSet, feeds_digest, save_feeds
from .variants import derive_policy, variant_noise

CALIBRATION_SEED = 100  # noise seeds of calibration observation k: 100 + k (as the export)
_EXPORT_CODE = ("graphs.py", "onnx_io.py")


def _sha(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()


def _code_digest() -> str:
    folder = Path(onnx_io.__file__).parent
    return _sha(*[(folder / f).read_bytes() for f in _EXPORT_CODE], version("torch"), version("onnx"),
                version("onnxruntime"), __version__)


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

    def _fp16(self, name: str, fp32: Path, key: str, built: list[str]) -> tuple[Path, str]:
        keep = list(self.options["fp16"]["keep_fp32_ops"])
        key16 = _sha(key, keep)[:20]

        def make(path: Path) -> dict[str, Any]:
            onnx_io.convert_fp16(fp32 / f"{name}.onnx", path, keep)
            return {"graph": name, "precision": "fp16", "keep_fp32_ops": keep}

        return self._entry("fp16", name, key16, make, built), key16

    def _kept(self, name: str, fp32: Path, key: str, built: list[str], precision: str) -> tuple[Path, str]:
        """A graph INT8 ``precision`` keeps in float: the FP32 one, or its ONNX Runtime fusion."""
        if not onnx_io.INT8_FORMATS[precision]["ort_fusions"]:
            return fp32, key
        key_fused = _sha(key, precision, "kept")[:20]

        def make(path: Path) -> dict[str, Any]:
            return {"graph": name, "precision": precision,
                    "fusions": onnx_io.keep_float(fp32 / f"{name}.onnx", path, precision)}

        return self._entry(precision, name, key_fused, make, built), key_fused

    def int8_settings(self, precision: str) -> dict[str, Any]:
        """Quantizer settings of an INT8 ``precision`` (``int8`` or ``int8_cpu``)."""
        return int8_settings(self.int8, self.options, precision)

    def _int8(self, name: str, fp32: Path, key: str, preset: Preset, method: str,
              built: list[str], precision: str = "int8") -> tuple[Path, str]:
        gdef = GRAPHS[name]
        _, refs = self.variant(preset, len(self.calibration))
        feeds = [{i: r[i].numpy() for i in gdef.inputs} for r in refs]
        digest = feeds_digest(feeds)
        s = self.int8_settings(precision)
        calib = qdq.calibrator_options(method, s.get("options"))
        key8 = _sha(key, digest, method, calib, s["op_types"], s["exclude_modules"], s.get("exclude_nodes", []),
                    onnx_io.INT8_FORMATS[precision])[:20]

        def make(path: Path) -> dict[str, Any]:
            feed_file = save_feeds(self.root / "feeds" / f"{name}-{digest[:20]}.npz", feeds)
            ranges = path.with_name(f"{name}{qdq.RANGES_SUFFIX}")
            with onnx_io.graph_to_quantize(fp32 / f"{name}.onnx", precision) as (src, fusions), \
                    onnx_io.quiet_tools():  # the histogram calibrators print their progress
                qdq.compute_ranges(src, feeds, method, s.get("options"), s["op_types"], ranges,
                                   symmetric=onnx_io.INT8_FORMATS[precision]["symmetric"])
                info = onnx_io.quantize_int8(src, path, feeds, s["op_types"], s["exclude_modules"],
                                             method, s.get("exclude_nodes", []), calibration_cache=ranges,
                                             variant=precision)
            if fusions:
                info["fusions"] = fusions
            scales = qdq.activation_scales(path)
            (path.parent / "scales.json").write_text(json.dumps(scales, indent=1))
            return {"graph": name, "precision": precision, "method": method, "calibrator_options": calib,
                    "feeds": str(feed_file.relative_to(self.root)), "feeds_sha256": digest,
                    "samples": len(feeds), **info}

        return self._entry(precision, name, key8, make, built), key8

    # ---- artifacts -----------------------------------------------------------------------
    def build(self, preset: Preset, precisions: list[str], action_mode: str, method: str = "minmax",
              label: str = "") -> BuiltConfig:
        """The artifact of ``preset`` with ``precisions`` (fp32 always), from cached graphs."""
        start = time.perf_counter()
        precisions = ["fp32"] + [p for p in PRECISIONS[1:] if p in precisions]
        policy, refs = self.variant(preset, 1)
        built: list[str] = []
        entries: dict[str, Path] = {}
        keys: dict[str, str] = {}
        for name in GRAPHS:
            key = self.fingerprint(name, policy, refs[0])
            entries[f"fp32/{name}"] = fp32 = self._fp32(name, policy, refs[0], key, built)
            keys[f"fp32/{name}"] = key
            if "fp16" in precisions:
                entries[f"fp16/{name}"], keys[f"fp16/{name}"] = self._fp16(name, fp32, key, built)
            for p in INT8_PRECISIONS:
                if p not in precisions:
                    continue
                if name in self.int8_settings(p)["graphs"]:
                    entries[f"{p}/{name}"], keys[f"{p}/{name}"] = self._int8(name, fp32, key, preset, method, built, p)
                else:  # e.g. the text graph: runs once per instruction, kept FP32
                    entries[f"{p}/{name}"], keys[f"{p}/{name}"] = self._kept(name, fp32, key, built, p)
        sigmas = list(policy.action_head.sigmas)
        config_key = _sha(preset.to_dict(), self.base.normalizer.to_dict(), self._tok_sha, action_mode, sigmas,
                          sorted(keys.items()), method if set(INT8_PRECISIONS) & set(precisions) else None)[:16]
        folder = self.root / "artifacts" / config_key
        if not (folder / "manifest.json").is_file():
            self.status("artifact")
            with atomic_dir(folder) as tmp:
                self._assemble(tmp, preset, precisions, entries, sigmas, action_mode, method, label)
        return BuiltConfig(config_key, folder, preset, keys, built, time.perf_counter() - start)

    def _assemble(self, tmp: Path, preset: Preset, precisions: list[str], entries: dict[str, Path],
                  sigmas: list[float], action_mode: str, method: str, label: str) -> None:
        graphs: dict[str, Any] = {}
        int8_graphs: dict[str, dict[str, Any]] = {p: {} for p in INT8_PRECISIONS}
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
            if precision in INT8_PRECISIONS:
                scales = entry / "scales.json"
                int8_graphs[precision][name] = ({k: info[k] for k in ("excluded_nodes", "quantize_nodes", "samples")}
                                     | {"activation_scales": json.loads(scales.read_text())}
                                     if scales.is_file() else {"kept": "fp32"})
        int8 = [p for p in INT8_PRECISIONS if p in precisions]
        for p in int8:
            s = self.int8_settings(p)
            qdq.write_record(tmp / p, method, {"calibrator": qdq.calibrator_options(method, s.get("options")),
                                               "op_types": s["op_types"], "exclude_modules": s["exclude_modules"],
                                               "exclude_nodes": s.get("exclude_nodes", [])},
                             int8_graphs[p], list(self.calibration.sources), self.calibration.digest())
        self.tokenizer.save(tmp)
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "vpp_edge_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": f"{self.source}; vpp calibrate configuration: {label or 'base'}",
            "preset": preset.to_dict(),
            "normalization": self.base.normalizer.to_dict(),
            **tokenizer_entry(tmp),
            "text_max_length": preset.text.goal_length,  # ids the text graph takes
            "sigmas": sigmas,
            "action_mode": action_mode,
            "graphs": graphs,
            "engines": {},
            "toolchain": {d: version(d) for d in ("torch", "onnx", "onnxruntime")},
        }
        if int8:
            manifest["calibration"] = {p: f"{p}/{qdq.CALIBRATION_FILE}" for p in int8}
        write_manifest(tmp, manifest)

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
