"""Paper-scale export paths on small models (issue 20): graphs with external data converted
tensor by tensor, their data hashed in the manifest, temporary folders of killed exports
removed, Ctrl-C leaving nothing. The full paper-scale export is the last test (skipped
unless VPP_PAPER_EXPORT=1: it takes most of an hour; make bench-paper-export runs it)."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from vpp_edge.export import external_data, graph_cache, onnx_io, tempdirs
from vpp_edge.export.options import load_options, precisions_for
from vpp_edge.runtime.manifest import ArtifactError, sha256_file, verify_entry

KEEP = ["LayerNormalization", "Softmax"]


def _model_with_external_data(path: Path) -> dict[str, np.ndarray]:
    """x[2, 64] -> MatMul w1 -> +b -> LayerNorm(gamma, beta) -> MatMul w2 -> Gather -> Softmax -> y; every
    initializer external. w1 holds values FP16 cannot represent (below its smallest subnormal,
    above its largest finite), which the conversion clamps."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((64, 128)).astype(np.float32) * 0.1
    w1[0, :4] = [1e-9, -1e-9, 1e6, -1e6]
    weights = {"w1": w1, "b": rng.standard_normal(128).astype(np.float32),
               "gamma": np.ones(128, np.float32), "beta": np.zeros(128, np.float32),
               "w2": rng.standard_normal((128, 32)).astype(np.float32) * 0.1,
               "index": np.arange(31, -1, -1, dtype=np.int64)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b"], ["hb"]),
             helper.make_node("LayerNormalization", ["hb", "gamma", "beta"], ["n"], axis=-1),
             helper.make_node("MatMul", ["n", "w2"], ["z"]), helper.make_node("Gather", ["z", "index"], ["zr"], axis=1),
             helper.make_node("Softmax", ["zr"], ["y"], axis=-1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32])],
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.save(model, str(path), save_as_external_data=True, location=f"{path.name}.data", size_threshold=0)
    return weights


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_fp16_of_external_data_streams_and_matches_the_in_memory_conversion(tmp_path, monkeypatch):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    src = tmp_path / "fp32" / "m.onnx"
    src.parent.mkdir()
    weights = _model_with_external_data(src)
    # Reference: ONNX Runtime's converter on the whole model loaded into memory (the old way).
    whole = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True, op_block_list=KEEP)
    expected = {t.name: numpy_helper.to_array(t) for t in whole.graph.initializer}

    real_load = onnx.load

    def graph_only_load(f, *args, **kwargs):
        assert kwargs.get("load_external_data") is False, "the pass loaded the weights with the graph"
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(onnx, "load", graph_only_load)
    dst = tmp_path / "fp16" / "m.onnx"
    onnx_io.convert_fp16(src, dst, KEEP)
    monkeypatch.setattr(onnx, "load", real_load)

    assert sorted(p.name for p in dst.parent.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert dst.stat().st_size < 4096, "the graph file holds no weights"
    model = onnx.load(str(dst), load_external_data=False)
    for t in model.graph.initializer:
        info = {e.key: e.value for e in t.external_data}
        assert info["location"] == "m.onnx.data" and int(info["offset"]) % external_data.ALIGNMENT == 0
    got = {t.name: numpy_helper.to_array(t, base_dir=str(dst.parent)) for t in model.graph.initializer}
    assert got.keys() == expected.keys()
    for name, arr in expected.items():
        assert got[name].dtype == arr.dtype and np.array_equal(got[name], arr), name
    assert got["w1"].dtype == np.float16 and got["index"].dtype == np.int64
    assert list(got["w1"][0, :4]) == [np.float16(5.96e-08), np.float16(-5.96e-08), 65504, -65504]
    assert got["gamma"].dtype == np.float32, "a LayerNorm weight (kept op) stays FP32"

    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    ref = _run(src, x)
    out = _run(dst, x)
    assert out.dtype == np.float32 and np.allclose(out, ref, atol=2e-3)
    assert np.array_equal(weights["w2"].astype(np.float16), got["w2"])


@pytest.mark.slow
def test_export_with_external_data_hashes_it_and_frees_the_model(tmp_path, tiny_preset, caplog):
    """The tiny model exported as paper scale is: every graph's weights in external data
    (threshold 0), FP16 converted tensor by tensor, the PyTorch weights freed after the FP32
    export, a stale temporary folder of a killed export removed first."""
    from vpp_edge.export.artifact import export_artifact
    from vpp_edge.training.models import build_policy

    policy, tok = build_policy(tiny_preset, seed=0)  # its own: release_policy empties it
    out = tmp_path / "art"
    stale = tmp_path / ".art.k1lled00"
    (stale / "fp32").mkdir(parents=True)
    (stale / "fp32" / "tvp.onnx.data").write_bytes(b"\0" * 1000)
    (stale / tempdirs.OWNER_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(),
                                                         "start": "1"}))
    options = load_options(precisions=["fp32", "fp16"], parity_samples=1, external_data_bytes=0)
    with caplog.at_level(logging.WARNING, logger="vpp_edge.export.tempdirs"):
        manifest = export_artifact(policy, tok, out, options, source="test", progress=False, release_policy=True)
    assert not stale.exists() and "removed" in caplog.text and str(stale) in caplog.text
    cache = graph_cache.export_cache(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [cache.name, "art"], "no temporary folder left"
    assert all(p.numel() == 0 for p in policy.parameters()), "the PyTorch weights were released"

    for key, entry in manifest["graphs"].items():
        model = onnx.load(str(out / entry["file"]), load_external_data=False)
        if any(t.dims for t in model.graph.initializer):
            assert entry["external_data"] == [{"file": f"{entry['file']}.data",
                                               "sha256": sha256_file(out / f"{entry['file']}.data")}], key
        verify_entry(out, key, entry)
    assert manifest["graphs"]["fp16/tvp"]["external_data"], "the FP16 TVP has external data"
    report = json.loads((out / "parity.json").read_text())
    assert all(s["passed"] for s in report["precisions"].values())
    phases = [p["phase"] for p in report["phases"]]
    assert phases[:2] == ["reference run", "export fp32/text"] and "release the PyTorch model" in phases
    assert "fp16/tvp" in phases and phases[-1] == "parity fp16"
    assert all(p["peak_rss_bytes"] > 0 and p["rss_bytes"] > 0 for p in report["phases"])
    assert [p["peak_rss_bytes"] for p in report["phases"]] == sorted(p["peak_rss_bytes"] for p in report["phases"])
    assert not (out / tempdirs.OWNER_FILE).exists()

    data = out / manifest["graphs"]["fp16/tvp"]["external_data"][0]["file"]
    with open(data, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ArtifactError, match="does not match the manifest.*fp16/tvp external data"):
        verify_entry(out, "fp16/tvp", manifest["graphs"]["fp16/tvp"])


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporary_folders_are_removed_and_others_reported(tmp_path, caplog):
    target = tmp_path / "art"
    host = socket.gethostname()

    def folder(name: str, owner: dict | None) -> Path:
        path = tmp_path / name
        (path / "fp32").mkdir(parents=True)
        (path / "fp32" / "tvp.onnx.data").write_bytes(b"\0" * 2048)
        if owner is not None:
            (path / tempdirs.OWNER_FILE).write_text(json.dumps(owner))
        return path

    dead = folder(".art.dead0000", {"host": host, "pid": _dead_pid(), "start": "123"})
    reused = folder(".art.reused00", {"host": host, "pid": os.getpid(), "start": "0"})  # the pid of a newer process
    tempdirs.claim(live := folder(".art.live0000", None))  # an export running now (this process)
    foreign = folder(".art.other000", {"host": "another-host", "pid": 1, "start": "1"})
    unmarked = folder(".art.nomark00", None)
    others = [folder(".art.old", None), folder(".artist.abcdefgh", None), folder(".art.toolongname", None)]

    with caplog.at_level(logging.WARNING, logger="vpp_edge.export.tempdirs"):
        found = tempdirs.sweep(target)
    states = {item.path.name: item.state for item in found}
    assert states == {dead.name: "stale", reused.name: "stale", live.name: "running", foreign.name: "unknown",
                      unmarked.name: "unknown"}
    assert all(item.bytes >= 2048 for item in found)
    assert not dead.exists() and not reused.exists()
    assert live.exists() and foreign.exists() and unmarked.exists() and all(p.exists() for p in others)
    for kept in (live, foreign, unmarked):
        assert f"rm -rf {kept}" in caplog.text
    assert "another-host" in caplog.text and "no owner record" in caplog.text


def _vpp(*args: str, **kwargs) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("vpp")
    return subprocess.Popen([str(exe), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"export ended before the test could interrupt it:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the export did not reach the point to interrupt it in time")
        time.sleep(0.1)


SWALLOWED = """
import os, signal, sys
from vpp_edge.export import tempdirs
sig, raised = int(sys.argv[1]), {"KeyboardInterrupt": KeyboardInterrupt, "Terminated": tempdirs.Terminated}[sys.argv[2]]

class SignalsWhenCollected:
    def __del__(self):
        os.kill(os.getpid(), sig)

reached = []
try:
    with tempdirs.terminate_as_interrupt():
        SignalsWhenCollected()  # collected at once: the handler's raise is swallowed
        reached.append("past the swallowed raise")
        tempdirs.raise_if_interrupted()
    print("not raised")
except raised:
    tempdirs.raise_if_interrupted()  # cleared once the block has unwound
    print("raised", "after the swallowed raise" if reached else "at once")
"""


@pytest.mark.parametrize("sig, raised", [(signal.SIGINT, "KeyboardInterrupt"), (signal.SIGTERM, "Terminated")])
def test_a_signal_swallowed_by_a_finaliser_still_ends_the_export(sig, raised):
    """Python drops an exception a signal handler raises inside ``__del__`` (seen in a full
    suite run: SIGTERM landed in an import lock's weakref callback and the export committed
    its artifact); the latch raises it again at the next phase boundary. In a fresh
    interpreter: pytest's own process may hold native libraries (NNCF's) that crash on a
    SIGINT sent to it (see docs/export.md)."""
    proc = subprocess.run([sys.executable, "-c", SWALLOWED, str(int(sig)), raised], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # "at once" would mean the handler's first raise was not swallowed: the latch untested.
    assert proc.stdout.strip() == "raised after the swallowed raise", (proc.stdout, proc.stderr[-2000:])


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_export_leaves_nothing(tmp_path, sig):
    """A real `vpp export` process, interrupted while it writes its FP32 graphs."""
    out = tmp_path / "art"
    proc = _vpp("export", "--preset", "tiny", "--out", str(out), "--precisions", "fp32", "--parity-samples", "1",
                "--quiet", cwd=tmp_path)

    def writing_graphs() -> bool:  # the graph cache's FP32 folder appears with the first graph
        return (graph_cache.export_cache(out) / "fp32").is_dir()

    _wait_for(writing_graphs, proc)
    proc.send_signal(sig)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output[-3000:]
    _only_complete_graphs_left(tmp_path, out)


def _only_complete_graphs_left(folder: Path, out: Path) -> None:
    """Nothing of an export to ``out`` is left in ``folder`` but its graph cache, and that
    without a temporary (half-written) entry."""
    cache = graph_cache.export_cache(out)
    assert [p.name for p in folder.iterdir()] in ([], [cache.name]), "the temporary folder was removed"
    assert not list(cache.glob("*/.*")), "no half-written graph in the cache"


@pytest.mark.slow
def test_killed_export_leaves_a_folder_the_next_export_removes(tmp_path):
    out = tmp_path / "art"
    proc = _vpp("export", "--preset", "tiny", "--out", str(out), "--precisions", "fp32", "--parity-samples", "1",
                "--quiet", cwd=tmp_path)
    _wait_for(lambda: any(tmp_path.glob(f".art.*/{tempdirs.OWNER_FILE}")), proc)
    proc.kill()  # SIGKILL, as the kernel's out-of-memory killer: nothing can clean up
    proc.communicate(timeout=60)
    [left] = tempdirs.leftovers(out)
    assert left.state == "stale" and "is gone" in left.detail
    tempdirs.sweep(out)  # what the next export to the same place does first
    graph_cache.sweep(graph_cache.export_cache(out))
    _only_complete_graphs_left(tmp_path, out)


def test_large_models_default_to_the_precisions_their_targets_run(tmp_path):
    options = load_options()
    limit = options["large_model"]["weight_bytes"]
    assert precisions_for(options, limit - 1, named=False) == options["precisions"]
    assert precisions_for(options, limit, named=False) == ["fp32"]
    assert precisions_for(options, limit, named=True) == options["precisions"]
    assert options["external_data_bytes"] == limit == 2**31, "paper scale = past protobuf's 2 GB"


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("VPP_PAPER_EXPORT"),
                    reason="paper-scale export (most of an hour on 2 cores): VPP_PAPER_EXPORT=1 to run it")
def test_paper_scale_export_completes_within_the_memory_bound(tmp_path):
    """`vpp export --preset calvin` (random weights) in a child process, through the
    benchmark (bench/paper_export.py): every gate passes, the peak resident memory of the
    export's whole process tree (the export and its parity workers) stays within 12 GB."""
    bench = Path(__file__).resolve().parents[1] / "bench" / "paper_export.py"
    result_file = tmp_path / "paper_export.json"
    proc = subprocess.run([sys.executable, str(bench), "--out", str(tmp_path / "calvin"), "--json", str(result_file)],
                          capture_output=True, text=True)
    result = json.loads(result_file.read_text())
    assert result["exit_code"] == 0, proc.stderr[-5000:]
    assert result["parity"] and all(s["passed"] for s in result["parity"].values())
    peak = result["tree_peak_rss_bytes"]
    assert 0 < peak <= 12e9, f"peak resident memory of the export's tree {peak / 1e9:.1f} GB"
    assert proc.returncode == 0
