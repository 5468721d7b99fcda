"""``vpp build-engines``: TensorRT engines from an artifact's ONNX graphs, on the machine
that will run them (engines are tied to the GPU and the TensorRT version).

Kept thin on purpose, to be read and checked on a real Jetson: parse from file (so
external data resolves), one static shape, FP16 or INT8-from-QDQ, a workspace limit and
a persisted timing cache. Everything else (selection, manifests, hashes) is plain Python
tested on machines without TensorRT.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vpp_edge import precisions
from vpp_edge.extras import require
from vpp_edge.runtime.manifest import (ArtifactError, machine_info, read_manifest, sha256_file, verify_entry,
                                       write_manifest)

log = logging.getLogger(__name__)
TIMING_CACHE = "engines/timing.cache"
# Which ONNX precision folder feeds which engine precision (the precision registry says).
ENGINE_SOURCES = precisions.engine_sources()


def select_graphs(manifest: dict[str, Any], precision: str) -> dict[str, str]:
    """Graph keys to build for ``precision``: {graph name: manifest key of its ONNX}."""
    if precision not in ENGINE_SOURCES:
        raise ArtifactError(f"engine precision '{precision}' unknown; allowed: {sorted(ENGINE_SOURCES)}")
    folder = ENGINE_SOURCES[precision]
    keys = {k.split("/", 1)[1]: k for k in manifest["graphs"] if k.startswith(f"{folder}/")}
    if not keys:
        raise ArtifactError(f"the artifact has no {folder} graphs to build {precision} engines from "
                            f"(export with precisions including {folder})")
    return keys


def network_flags(trt: Any) -> int:
    """``create_network`` flags for an ONNX graph: 0 on TensorRT >= 10, where every network is
    explicit-batch (the flag is deprecated there); the EXPLICIT_BATCH bit on TensorRT 8.x,
    whose default implicit-batch network the ONNX parser rejects. (The deploy profiles
    require TensorRT >= 10.3; this keeps `vpp build-engines` honest on older installs.)"""
    major = int(str(trt.__version__).split(".")[0])
    if major >= 10:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)


def build_engine(onnx_path: Path, engine_path: Path, precision: str, workspace_bytes: int,
                 timing_cache: Path) -> dict[str, Any]:
    """Build one engine with TensorRT's Python API; returns the builder flags used."""
    trt = require("tensorrt", "building TensorRT engines")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ArtifactError(f"{onnx_path}: TensorRT could not parse the graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    flags = ["FP16"]
    config.set_flag(trt.BuilderFlag.FP16)
    if precisions.get(precision).qdq is not None:  # scales come from the graph's Q/DQ nodes: no calibrator
        config.set_flag(trt.BuilderFlag.INT8)
        flags.append("INT8")
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ArtifactError(f"{onnx_path}: TensorRT engine build failed (see the TensorRT log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"flags": flags, "workspace_bytes": workspace_bytes}


def build_engines(artifact: str | Path, precisions: list[str], workspace_gb: float = 4.0) -> dict[str, Any]:
    """Build (or rebuild) engines for ``precisions`` and record them in the manifest."""
    require("tensorrt", "building TensorRT engines")
    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    machine = machine_info()
    timing_cache = artifact / TIMING_CACHE
    for precision in precisions:
        for graph, key in select_graphs(manifest, precision).items():
            onnx_path = verify_entry(artifact, key, manifest["graphs"][key])
            engine_key = f"{precision}/{graph}"
            engine_path = artifact / "engines" / precision / f"{graph}.plan"
            log.info("building %s from %s", engine_key, onnx_path)
            build = build_engine(onnx_path, engine_path, precision, int(workspace_gb * 2**30), timing_cache)
            manifest["engines"][engine_key] = {
                "file": str(engine_path.relative_to(artifact)),
                "sha256": sha256_file(engine_path),
                "precision": precision,
                "source_graph": key,
                "source_sha256": manifest["graphs"][key]["sha256"],
                "inputs": manifest["graphs"][key]["inputs"],
                "outputs": manifest["graphs"][key]["outputs"],
                "builder": build,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                **machine,
            }
    write_manifest(artifact, manifest)
    return manifest
