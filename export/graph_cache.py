"""The one graph builder of artifacts, shared by ``vpp export`` and ``vpp calibrate``.

Every graph of an artifact is exported from the PyTorch policy (FP32) or derived from its
FP32 graph (:mod:`.derive`) once, and cached under a key that says what it computes:

* FP32: a *behaviour fingerprint*: the graph's adapter run on seeded probe inputs of its
  input shapes, hashed with the input specs, opset, external-data threshold and exporter
  code. Two models whose graph computes the same function share one export; a knob that
  does not change a graph (for example the TVP scheduler steps with Karras sigmas, whose
  first noise level is sigma_max for every N) is recognised as such.
* every other precision: the FP32 key + its options; for a graph an INT8 precision
  quantises, also the calibration feeds (the graph's inputs on the calibration set) and the
  calibrator.

Layout under ``root``::

    <precision>/<graph>-<key>/   <graph>.onnx (+ .data; INT8: .ranges.json), info.json

An artifact links its entries' files (hard links; a copy across file systems), so a graph
in the cache and in the artifact costs its bytes once. Every entry is written to a
temporary folder with an owner record (:mod:`.tempdirs`) and renamed into place, so an
interrupted build never leaves a half-written graph that a later one would trust, and the
next build removes what a killed one left.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import numpy as np
import torch

from vpp_edge import __version__, precisions
from vpp_edge.extras import require
from vpp_edge.files import atomic_dir
from vpp_edge.training.models.policy import VPPPolicy

from . import onnx_io, qdq, tempdirs
from .phases import release_freed_memory
from .derive import KEPT, derive_graph, int8_settings, quantizes, record_graph, write_calibration
from .graphs import GRAPHS

log = logging.getLogger(__name__)

INFO_FILE = "info.json"
# What info.json holds besides the derivation's own record (derive_graph's result).
BOOKKEEPING = ("graph", "precision", "entry", "record", "files")

Feeds = list[dict[str, np.ndarray]]


def export_cache(out: Path) -> Path:
    """Where ``vpp export`` to ``out`` caches its graphs: beside it (``.<name>-graphs``), on
    the same file system, so the artifact's graphs are links to the cached ones."""
    return out.with_name(f".{out.name}-graphs")


def sha(*parts: Any) -> str:
    """sha256 over ``parts`` (bytes as they are, anything else as sorted JSON)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()


def feeds_digest(feeds: Sequence[dict[str, np.ndarray]]) -> str:
    """sha256 over a feed list (names, shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    for feed in feeds:
        for name in sorted(feed):
            a = np.ascontiguousarray(feed[name])
            h.update(f"{name}:{a.dtype}:{a.shape};".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def code_digest() -> str:
    """What the graphs are made by: a change in this code or these versions is a new graph."""
    from vpp_edge import graph_spec
    from vpp_edge.training.models import graph_modules

    from . import derive, external_data, graphs

    code = [Path(m.__file__).read_bytes() for m in (graph_spec, graph_modules, graphs, onnx_io, derive, qdq,
                                                    external_data)]
    # onnxscript: torch's exporter rewrites the graph with its optimizer.
    return sha(*code, *(version(p) for p in ("torch", "onnx", "onnxruntime", "onnxscript")), __version__)


def graph_fingerprint(name: str, policy: VPPPolicy, ref: dict[str, torch.Tensor], opset: int, code: str = "") -> str:
    """What graph ``name`` of ``policy`` computes, as a hash: its adapter run on seeded
    probe inputs shaped like ``ref`` (a reference run), with the input specs, the opset and
    ``code`` (a digest of the exporter's code, versions and options)."""
    gdef = GRAPHS[name]
    gen = torch.Generator().manual_seed(1234)
    probe, specs = [], []
    for i in gdef.inputs_for(policy.preset):
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
    return sha(name, specs, opset, code, *[o.detach().contiguous().numpy().tobytes() for o in outs])[:20]


def link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


def _graph_files(folder: Path) -> list[Path]:
    """The files of an entry that an artifact takes: the graph, its external data, its ranges."""
    return sorted(f for f in folder.iterdir()
                  if f.suffix in (".onnx", ".data") or f.name.endswith(qdq.RANGES_SUFFIX))


def _stats(folder: Path) -> dict[str, list[int]]:
    """Size and modification time of each graph file: an artifact links them, so a file
    changed in place in an artifact would change the cached one too."""
    return {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in _graph_files(folder)}


@dataclass(frozen=True)
class Entry:
    """One cached graph: its folder, its key and its ``info.json``."""

    folder: Path
    key: str
    info: dict[str, Any]


@dataclass
class GraphSet:
    """The cached graphs of one artifact, by ``"<precision>/<graph>"``."""

    entries: dict[str, Entry] = field(default_factory=dict)
    built: list[str] = field(default_factory=list)  # graphs exported/derived this time

    @property
    def keys(self) -> dict[str, str]:
        return {k: e.key for k, e in self.entries.items()}

    def file(self, key: str) -> Path:
        """The cached ``.onnx`` file of graph ``key``."""
        return self.entries[key].folder / f"{key.split('/')[1]}.onnx"

    def derivation(self, key: str) -> dict[str, Any]:
        """What making graph ``key`` did (:func:`derive_graph`'s record); :data:`KEPT` for a
        graph that its precision takes as the FP32 one."""
        info = self.entries[key].info
        if info["precision"] != key.split("/")[0]:
            return dict(KEPT)
        return {k: v for k, v in info.items() if k not in BOOKKEEPING}

    def link(self, folder: Path) -> dict[str, dict[str, Any]]:
        """Link every graph's files into ``folder/<precision>/``; returns the manifest's
        ``graphs`` (the entries as recorded when the graphs were made, paths made relative to
        ``folder``)."""
        graphs: dict[str, dict[str, Any]] = {}
        for key, entry in self.entries.items():
            precision = key.split("/")[0]
            (folder / precision).mkdir(exist_ok=True)
            for f in _graph_files(entry.folder):
                link_or_copy(f, folder / precision / f.name)
            g = dict(entry.info["entry"], precision=precision, file=f"{precision}/{entry.info['entry']['file']}")
            g["external_data"] = [dict(x, file=f"{precision}/{x['file']}") for x in g["external_data"]]
            graphs[key] = g
        return graphs

    def calibration(self, folder: Path, options: dict[str, Any], int8: dict[str, Any], method: str,
                    sources: list[str], digest: str) -> dict[str, str]:
        """The calibration record of every calibrated precision in the set, written into
        ``folder/<precision>/``; returns the manifest's ``calibration``."""
        records: dict[str, dict[str, Any]] = {}
        for key, entry in self.entries.items():
            precision, name = key.split("/")
            if precision in precisions.calibrated():  # a graph kept as the FP32 one has no record of its own
                records.setdefault(precision, {})[name] = entry.info.get("record", dict(KEPT))
        return {p: write_calibration(folder / p, p, options, int8, method, graph_records, sources, digest)
                for p, graph_records in records.items()}


def _no_stage(label: str) -> ContextManager[None]:
    return contextlib.nullcontext()


class GraphCache:
    """Graphs of policies, made once under ``root`` (see the module's docstring)."""

    def __init__(self, root: str | Path, options: dict[str, Any], int8: dict[str, Any] | None = None,
                 status: Callable[[str], None] = lambda s: None):
        """``options``: the export options (``load_options()``: opset, external_data_bytes, fp16,
        int8, int8_cpu); ``int8``: quantizer settings (default ``options["int8"]``: a sweep
        passes its own); ``status``: told each graph it makes."""
        self.root = Path(root)
        self.options = options
        self.int8 = options["int8"] if int8 is None else int8
        self.status = status
        self._code = sha(code_digest(), options["external_data_bytes"])
        sweep(self.root)

    def fingerprint(self, name: str, policy: VPPPolicy, ref: dict[str, torch.Tensor]) -> str:
        return graph_fingerprint(name, policy, ref, self.options["opset"], self._code)

    def build(self, policy: VPPPolicy, ref: dict[str, torch.Tensor], wanted: Sequence[str],
              feeds: Callable[[str], Feeds], method: str = "minmax", *,
              stage: Callable[[str], ContextManager[Any]] = _no_stage,
              after_fp32: Callable[[GraphSet], None] = lambda graphs: None) -> GraphSet:
        """Every graph of ``policy`` in the precisions ``wanted`` (the reference first), from the cache
        or made now. ``ref``: a reference run (the FP32 graphs are traced on it);
        ``feeds(graph)``: the graph's inputs on the calibration observations (asked only for
        a graph an INT8 precision quantises); ``stage(key)``: a context around each graph
        (the export's progress); ``after_fp32``: called once the FP32 graphs exist, before
        any is derived (the export frees the PyTorch weights there)."""
        reference, *derived = wanted
        graphs = GraphSet()
        for name in GRAPHS:
            with stage(f"{reference}/{name}"):
                graphs.entries[f"{reference}/{name}"] = self._fp32(name, policy, ref, graphs.built)
        for precision, name in self.in_pytorch(policy, derived):  # they need the PyTorch model
            with stage(f"{precision}/{name}"):
                graphs.entries[f"{precision}/{name}"] = self._ptq(
                    precision, name, policy, graphs.entries[f"{reference}/{name}"], feeds, graphs.built)
        after_fp32(graphs)
        for precision in derived:
            for name in GRAPHS:
                if f"{precision}/{name}" in graphs.entries:
                    continue
                with stage(f"{precision}/{name}"):
                    graphs.entries[f"{precision}/{name}"] = self._derived(
                        precision, name, graphs.entries[f"{reference}/{name}"], feeds, method, graphs.built)
        return graphs

    def prune(self, keep: GraphSet) -> list[Path]:
        """Remove every cached graph but those of ``keep`` (``vpp export``'s cache holds the
        graphs of its latest artifact only: they cost nothing beside it, being links).
        Returns the folders removed."""
        kept = {e.folder for e in keep.entries.values()}
        removed = [f for f in self.root.glob(f"*/*/{INFO_FILE}") if f.parent not in kept]
        for f in removed:
            shutil.rmtree(f.parent, ignore_errors=True)
        return [f.parent for f in removed]

    def drop(self, graphs: GraphSet, failed: Sequence[str]) -> None:
        """Remove the graphs that ``graphs`` made for the ``failed`` precisions (they failed a
        parity gate: never reused). A graph such a precision takes as the FP32 one stays."""
        for key, entry in graphs.entries.items():
            if key.split("/")[0] in failed and entry.info["precision"] == key.split("/")[0]:
                shutil.rmtree(entry.folder, ignore_errors=True)

    def tidy(self) -> None:
        """Remove the cache's empty folders (all of it when it holds no graph)."""
        if not self.root.is_dir():
            return
        for folder in [*sorted(p for p in self.root.iterdir() if p.is_dir()), self.root]:
            with contextlib.suppress(OSError):  # not empty
                folder.rmdir()

    # ---- entries -------------------------------------------------------------------------
    def _entry(self, precision: str, name: str, key: str, make: Callable[[Path], dict[str, Any]],
               built: list[str]) -> Entry:
        folder = self.root / precision / f"{name}-{key}"
        cached = _read_info(folder)
        if cached is not None:
            return Entry(folder, key, cached)
        self.status(f"{precision}/{name}")
        with atomic_dir(folder) as tmp:
            tempdirs.claim(tmp)
            info = make(tmp / f"{name}.onnx")
            info["entry"] = onnx_io.graph_entry(tmp / f"{name}.onnx", tmp, precision)
            info["files"] = _stats(tmp)
            (tmp / INFO_FILE).write_text(json.dumps(info, indent=1, default=str))
            tempdirs.release(tmp)
        built.append(f"{precision}/{name}")
        return Entry(folder, key, info)

    def _fp32(self, name: str, policy: VPPPolicy, ref: dict[str, torch.Tensor], built: list[str]) -> Entry:
        gdef = GRAPHS[name]
        inputs = gdef.inputs_for(policy.preset)

        def make(path: Path) -> dict[str, Any]:
            onnx_io.export_onnx(gdef.adapter(policy), tuple(ref[i] for i in inputs), inputs, gdef.outputs, path,
                                self.options["opset"], self.options["external_data_bytes"])
            return {"graph": name, "precision": precisions.reference()}

        return self._entry(precisions.reference(), name, self.fingerprint(name, policy, ref), make, built)

    def in_pytorch(self, policy: VPPPolicy, derived: Sequence[str]) -> list[tuple[str, str]]:
        """The (precision, graph) pairs quantised in PyTorch by NVIDIA's path
        (:mod:`.modelopt_int8`) instead of ONNX Runtime's quantiser: for a model whose weights
        reach ``large_model.weight_bytes``, the graphs of ``large_model.int8_in_pytorch`` that
        a TensorRT Q/DQ precision quantises (ONNX Runtime's calibrator keeps every activation
        of the graph per sample: it does not fit a paper-scale TVP graph)."""
        large = self.options["large_model"]
        if sum(p.numel() * p.element_size() for p in policy.parameters()) < int(large["weight_bytes"]):
            return []
        return [(p, n) for p in derived if precisions.get(p).qdq is not None and "tensorrt" in precisions.get(p).engines
                for n in large["int8_in_pytorch"] if quantizes(p, n, self.options, self.int8)]

    def _ptq(self, precision: str, name: str, policy: VPPPolicy, fp32: Entry, feeds: Callable[[str], Feeds],
             built: list[str]) -> Entry:
        """Graph ``name`` of ``precision`` by post-training quantisation of the policy in
        PyTorch (nvidia-modelopt), exported as a Q/DQ graph; cached under the FP32 key, the
        calibration feeds, the exclusions and modelopt's version."""
        from . import modelopt_int8

        require("modelopt", f"INT8 ({precision}) of a model this large")
        calibration = feeds(name)
        s = int8_settings(self.int8, self.options, precision)
        key = sha(fp32.key, "modelopt", modelopt_int8.version(), feeds_digest(calibration), s["exclude_modules"])[:20]
        gdef = GRAPHS[name]
        inputs = gdef.inputs_for(policy.preset)

        def make(path: Path) -> dict[str, Any]:
            release_freed_memory()  # what the FP32 exports left: the tracing exporter adds gigabytes here
            args = [tuple(torch.from_numpy(f[i]) for i in inputs) for f in calibration]
            info = modelopt_int8.derive(gdef.adapter(policy), args, path, inputs, gdef.outputs, self.options["opset"],
                                        s["exclude_modules"])
            info.update(method="modelopt max", feeds_sha256=feeds_digest(calibration))
            info["record"] = record_graph(info, path)
            return {"graph": name, "precision": precision, **info}

        return self._entry(precision, name, key, make, built)

    def _derived(self, precision: str, name: str, fp32: Entry, feeds: Callable[[str], Feeds], method: str,
                 built: list[str]) -> Entry:
        """Graph ``name`` of ``precision`` derived from its FP32 entry, cached under a key of
        what it is derived from: the FP32 key, the precision's options and, for a graph it
        quantises, the calibration feeds and the calibrator."""
        spec = precisions.get(precision)
        calibration: Feeds = []
        if spec.qdq is None:
            key = sha(fp32.key, precision, list(self.options["fp16"]["keep_fp32_ops"]))[:20]
        elif not quantizes(precision, name, self.options, self.int8):
            if not spec.qdq.ort_fusions:  # kept in float as it is: the FP32 graph itself
                return fp32
            key = sha(fp32.key, precision, "kept")[:20]
        else:
            calibration = feeds(name)
            s = int8_settings(self.int8, self.options, precision)
            key = sha(fp32.key, feeds_digest(calibration), method, qdq.calibrator_options(method, s.get("options")),
                      s["op_types"], s["exclude_modules"], s.get("exclude_nodes", []),
                      dataclasses.asdict(spec.qdq))[:20]

        def make(path: Path) -> dict[str, Any]:
            ranges = path.with_name(f"{name}{qdq.RANGES_SUFFIX}") if calibration else None
            info = derive_graph(precision, name, fp32.folder / f"{name}.onnx", path, self.options, self.int8,
                                calibration, method, ranges)
            if calibration:
                info.update(method=method, feeds_sha256=feeds_digest(calibration))
            if spec.calibrated:
                info["record"] = record_graph(info, path)
            return {"graph": name, "precision": precision, **info}

        return self._entry(precision, name, key, make, built)


def _read_info(folder: Path) -> dict[str, Any] | None:
    """The info of a complete cache entry whose files are as they were written; None for a
    missing entry or one whose files changed since (it is made again)."""
    try:
        info = json.loads((folder / INFO_FILE).read_text())
    except (OSError, ValueError):
        return None
    if info.get("files") != _stats(folder):
        log.warning("%s: its graph files changed since they were written; making it again", folder)
        return None
    return info


def sweep(root: Path) -> None:
    """Remove the temporary folders that killed builds left under ``root`` (and report the
    ones of builds still running), as :func:`.tempdirs.sweep` does for artifacts."""
    for tmp in sorted(root.glob("*/.*")):
        entry, _, suffix = tmp.name[1:].rpartition(".")
        if entry and tmp.is_dir():
            tempdirs.sweep(tmp.with_name(entry))
