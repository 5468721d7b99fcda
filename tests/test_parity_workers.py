"""Parity gates run each graph's ONNX Runtime session in a worker process (issue 20: at paper
scale the exporting process's memory must not add to a session's). The workers give the
figures an in-process evaluation gives, and a worker that fails or hangs is a clear error."""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest

from vpp_edge.export import artifact as art
from vpp_edge.export import onnx_io, parity
from vpp_edge.export.graphs import GRAPHS
from vpp_edge.export.options import load_options
from vpp_edge.export.parity import GraphWorker, ParityError, WorkerRunner
from vpp_edge.observations import sample_observations


def _refs(tiny_policy, tiny_preset, n=2):
    policy, tok = tiny_policy
    obs = sample_observations(tiny_preset.num_views, tiny_preset.image_size, n)
    return [art._numpy(art.reference(policy, tok, o, seed=k)) for k, o in enumerate(obs)]


def _in_process(paths, refs, sigmas, mode):
    """The figures with every session in this process (what the export did before the
    workers), with the workers' session settings (lean: other kernels, other rounding)."""
    run = art.runner({g: onnx_io.session(p, lean=True) for g, p in paths.items()})
    graphs = {g: {o: parity.worst([parity.compare(r[o], run(g, parity.feeds(g, r))[o]) for r in refs])
                  for o in spec.outputs} for g, spec in GRAPHS.items()}
    actions = parity.worst([parity.compare(r["actions"], parity.chain(run, r, sigmas, mode)) for r in refs])
    return graphs, actions


@pytest.mark.parametrize("precision", ["fp32", "int8_cpu"])
def test_workers_give_the_in_process_figures(exported, tiny_policy, tiny_preset, precision):
    out, manifest = exported
    paths = {g: out / precision / f"{g}.onnx" for g in GRAPHS}
    refs = _refs(tiny_policy, tiny_preset)
    gates = load_options()["gates"]
    scale, offset = np.ones(7, np.float32), np.zeros(7, np.float32)
    mode = "step"  # it chains the most graphs (the per-graph figures do not depend on the mode)
    section = parity.evaluate_precision(precision, paths, refs, manifest["sigmas"], mode, scale, offset, gates)
    graphs, actions = _in_process(paths, refs, manifest["sigmas"], mode)
    for g, outputs in graphs.items():
        for o, s in outputs.items():
            assert section["graphs"][g][o]["max_abs"] == pytest.approx(s["max_abs"], rel=1e-5, abs=1e-7), (g, o)
            assert section["graphs"][g][o]["cosine"] == pytest.approx(s["cosine"], abs=1e-9), (g, o)
    assert section["actions"]["max_abs"] == pytest.approx(actions["max_abs"], rel=1e-5, abs=1e-7)
    assert section["actions"]["cosine"] == pytest.approx(actions["cosine"], abs=1e-9)
    assert section["passed"]
    # every graph had its worker (its peak memory reported), none ran beside another
    assert set(section["worker_peak_rss_bytes"]) == set(GRAPHS)
    assert all(v > 0 for v in section["worker_peak_rss_bytes"].values())


def test_one_worker_at_a_time(exported):
    out, _ = exported
    opened = []
    with WorkerRunner({g: out / "fp32" / f"{g}.onnx" for g in GRAPHS},
                      on_open=lambda g, w: opened.append(w)) as run:
        run.open("text")
        run.open("text")  # the open worker is reused
        run.open("former")
        assert [w.name for w in opened] == ["text", "former"]
        assert opened[0]._proc.poll() is not None, "the text worker ended before the former's started"
        assert opened[1]._proc.poll() is None
    assert opened[1]._proc.poll() is not None, "closing the runner ends its worker"


def test_a_worker_that_dies_is_a_clear_error():
    died = (sys.executable, "-c", "import sys; sys.stderr.write('out of memory, say\\n'); sys.exit(3)")
    with pytest.raises(ParityError, match=r"(?s)graph 'tvp'.*exit code 3.*out of memory, say"):
        GraphWorker("tvp", "unused.onnx", command=died, timeout_s=60)


def test_a_hung_worker_is_killed_after_its_timeout():
    hung = (sys.executable, "-c", "import time; time.sleep(600)")
    start = time.monotonic()
    with pytest.raises(ParityError, match="graph 'tvp'.*did not (read|answer)"):
        GraphWorker("tvp", "unused.onnx", command=hung, timeout_s=2)
    assert time.monotonic() - start < 30


def test_a_graph_the_worker_cannot_load_fails_with_its_error(tmp_path):
    bad = tmp_path / "tvp.onnx"
    bad.write_bytes(b"not a graph")
    with pytest.raises(ParityError, match=r"(?s)graph 'tvp'.*failed.*onnxruntime"):
        GraphWorker("tvp", bad)


def test_a_worker_that_fails_mid_run_says_why(exported):
    out, _ = exported
    worker = GraphWorker("former", out / "fp32" / "former.onnx")
    with pytest.raises(ParityError, match=r"(?s)graph 'former'.*failed.*features"):
        worker.run({"features": np.zeros((1, 2), np.float32)})  # wrong shape
    assert worker._proc.poll() is not None, "a failed worker is ended"
