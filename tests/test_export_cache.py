"""`vpp export` builds its graphs through the graph cache that `vpp calibrate` uses
(export/graph_cache.py): a second export of the same model and options exports nothing,
its artifact's graphs are the cached files; a changed option makes what it changes again."""

from __future__ import annotations

import json

import pytest

from vpp_edge.export import graph_cache
from vpp_edge.export.artifact import export_artifact
from vpp_edge.export.graphs import GRAPHS
from vpp_edge.export.options import load_options


def _inodes(out, precision: str) -> dict[str, int]:
    return {name: (out / precision / f"{name}.onnx").stat().st_ino for name in GRAPHS}


@pytest.mark.slow
def test_a_repeated_export_reuses_its_graphs_and_a_changed_option_rebuilds(tiny_policy, tmp_path, monkeypatch):
    policy, tok = tiny_policy
    made: list[str] = []
    export_onnx, derive_graph = graph_cache.onnx_io.export_onnx, graph_cache.derive_graph

    def counted_export(module, args, inputs, outputs, path, *rest):
        made.append(f"fp32/{path.stem}")
        return export_onnx(module, args, inputs, outputs, path, *rest)

    def counted_derive(precision, name, *args, **kwargs):
        made.append(f"{precision}/{name}")
        return derive_graph(precision, name, *args, **kwargs)

    monkeypatch.setattr(graph_cache.onnx_io, "export_onnx", counted_export)
    monkeypatch.setattr(graph_cache, "derive_graph", counted_derive)
    out = tmp_path / "art"
    options = load_options(precisions=["fp32", "fp16"], parity_samples=1)

    first = export_artifact(policy, tok, out, options, source="test", progress=False)
    assert sorted(made) == sorted(f"{p}/{n}" for p in ("fp32", "fp16") for n in GRAPHS)
    fp32, fp16 = _inodes(out, "fp32"), _inodes(out, "fp16")

    made.clear()
    second = export_artifact(policy, tok, out, options, source="test", progress=False)
    assert made == [], "the same model and options: nothing exported or converted again"
    assert _inodes(out, "fp32") == fp32 and _inodes(out, "fp16") == fp16, "the artifact links the cached graphs"
    assert second["graphs"] == first["graphs"]

    keep = [*options["fp16"]["keep_fp32_ops"], "Gelu"]
    changed = load_options(precisions=["fp32", "fp16"], parity_samples=1, fp16={"keep_fp32_ops": keep})
    made.clear()
    third = export_artifact(policy, tok, out, changed, source="test", progress=False)
    assert sorted(made) == sorted(f"fp16/{n}" for n in GRAPHS), "only the FP16 graphs depend on the option"
    assert _inodes(out, "fp32") == fp32 and not set(_inodes(out, "fp16").values()) & set(fp16.values())
    assert {k: v for k, v in third["graphs"].items() if k.startswith("fp32/")} == \
        {k: v for k, v in first["graphs"].items() if k.startswith("fp32/")}
    # The export's cache keeps the graphs of its latest artifact only (links: no extra bytes).
    cached = sorted(p.parent.name for p in graph_cache.export_cache(out).glob(f"*/*/{graph_cache.INFO_FILE}"))
    assert len(cached) == 2 * len(GRAPHS) and all(f.stat().st_nlink == 2 for f in (out / "fp16").glob("*.onnx"))


def test_a_graph_changed_in_place_is_made_again(tmp_path):
    """An artifact's graphs are links to the cached files: one edited in place in the
    artifact is no longer trusted in the cache."""
    entry = tmp_path / "fp32" / "text-0123"
    entry.mkdir(parents=True)
    (entry / "text.onnx").write_bytes(b"graph")
    info = {"graph": "text", "precision": "fp32", "files": graph_cache._stats(entry)}
    (entry / graph_cache.INFO_FILE).write_text(json.dumps(info))
    assert graph_cache._read_info(entry) == info
    (entry / "text.onnx").write_bytes(b"edited")
    assert graph_cache._read_info(entry) is None
