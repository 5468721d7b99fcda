"""Parity figures (max-abs error, cosine), the gates that fail an export, and their
evaluation with each graph's ONNX Runtime session in a worker process of its own.

Run as ``python -m vpp_edge.export.parity --worker`` it is that worker (no torch)."""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import logging
import os
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from vpp_edge.runtime.predict_step import predict_actions

from vpp_edge.errors import VPPError
from vpp_edge.graph_spec import GRAPHS, STATE_INPUT
from vpp_edge.precisions import get as precision_spec

log = logging.getLogger(__name__)


class ParityError(VPPError):
    """An exported graph does not reproduce the PyTorch model within its gate."""


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """max |ref - cand| and the cosine of the flattened tensors (both in float64)."""
    a = np.asarray(reference, np.float64).ravel()
    b = np.asarray(candidate, np.float64).ravel()
    if a.shape != b.shape:
        raise ParityError(f"shape mismatch: reference {np.shape(reference)} vs candidate {np.shape(candidate)}")
    if not np.all(np.isfinite(b)):
        return {"max_abs": float("inf"), "cosine": float("nan")}
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    cosine = 1.0 if na == nb == 0 else float(a @ b / (na * nb)) if na and nb else 0.0
    return {"max_abs": float(np.max(np.abs(a - b))) if a.size else 0.0, "cosine": cosine}


def worst(stats: list[dict[str, float]]) -> dict[str, float]:
    """Worst case over samples: largest error, smallest cosine (NaN counts as failing)."""
    cos = [s["cosine"] for s in stats]
    return {"max_abs": max(s["max_abs"] for s in stats),
            "cosine": float("nan") if any(np.isnan(cos)) else min(cos)}


def passes(stat: dict[str, float], min_cosine: float | None = None, max_abs: float | None = None) -> bool:
    if min_cosine is not None and not stat["cosine"] >= min_cosine:  # NaN fails
        return False
    return max_abs is None or stat["max_abs"] <= max_abs


def action_gate(kind: str, actions: dict[str, float], gates: dict[str, float]) -> tuple[str, bool]:
    """The action chunk's gate of a precision whose spec names gate ``kind`` (fp32, fp16, int8;
    see :mod:`vpp_edge.precisions`) with the export options' ``gates``: (its text, passed)."""
    if kind == "int8":
        return (f"cosine >= {gates['int8_action_cosine']}, max-abs <= {gates['int8_action_max_abs']}",
                passes(actions, gates["int8_action_cosine"], gates["int8_action_max_abs"]))
    return f"cosine >= {gates[f'{kind}_action_cosine']}", passes(actions, gates[f"{kind}_action_cosine"])


def summary_table(report: dict[str, Any]) -> str:
    """Markdown table of every figure in a parity report."""
    lines = ["| precision | graph | output | max-abs | cosine | gate |", "| --- | --- | --- | --- | --- | --- |"]
    for precision, section in report["precisions"].items():
        for graph, outputs in section["graphs"].items():
            for output, s in outputs.items():
                lines.append(f"| {precision} | {graph} | {output} | {s['max_abs']:.3g} | {s['cosine']:.6f} | "
                             f"{s.get('gate', '')} |")
        a = section["actions"]
        lines.append(f"| {precision} | **action chunk** | actions | {a['max_abs']:.3g} | {a['cosine']:.6f} | "
                     f"{'pass' if section['passed'] else 'FAIL'} ({section['gate']}) |")
    return "\n".join(lines)


# --- Gate evaluation with the ONNX Runtime sessions in worker processes ---------------------
#
# At paper scale one ONNX Runtime session of the TVP graph holds 9 GB (FP32) to 12 GB (FP16),
# and the exporting process still holds gigabytes the torch exporter left behind. So every
# precision's graphs are run in child processes, one graph (one session) at a time: a child
# loads only its graph's session and receives the inputs the parent saved from the PyTorch
# reference run; it never imports torch. Tiny and paper-scale exports take this same path.

# Seconds one request to a worker may take (its session's load, one run of its graph) before
# the worker is killed and the export fails: a paper-scale TVP session loads and runs in
# minutes on 2 cores; a hung worker ends the export within the hour instead of never.
WORKER_TIMEOUT_S = 3600.0
# The worker: this module run as a script (it imports numpy, onnx and onnxruntime only).
WORKER_COMMAND = (sys.executable, "-m", "vpp_edge.export.parity", "--worker")
_LEN = struct.Struct("<Q")  # every message: its byte length, then the message (see _encode)


def _encode(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
    """A message without pickle: a JSON header (``meta``) and the arrays as an .npz archive,
    read back with ``allow_pickle=False`` (an object array is refused when read)."""
    head = json.dumps(meta).encode()
    body = io.BytesIO()
    np.savez(body, **arrays)
    return _LEN.pack(len(head)) + head + body.getvalue()


def _decode(data: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    (n,) = _LEN.unpack_from(data)
    meta = json.loads(data[_LEN.size:_LEN.size + n])
    with np.load(io.BytesIO(data[_LEN.size + n:]), allow_pickle=False) as archive:
        return meta, {name: archive[name] for name in archive.files}


def _send(fd: int, meta: dict[str, Any], arrays: dict[str, np.ndarray], deadline: float, who: str) -> None:
    payload = _encode(meta, arrays)
    data = memoryview(_LEN.pack(len(payload)) + payload)
    while data:
        if not select.select([], [fd], [], max(0.0, deadline - time.monotonic()))[1]:
            raise TimeoutError(f"{who} did not read its request within the time allowed")
        data = data[os.write(fd, data):]


def _recv_exact(fd: int, n: int, deadline: float | None, who: str) -> bytes:
    chunks, got = [], 0
    while got < n:
        if deadline is not None and not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            raise TimeoutError(f"{who} did not answer within the time allowed")
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            raise EOFError(f"{who} closed its end")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _recv(fd: int, deadline: float | None, who: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    (n,) = _LEN.unpack(_recv_exact(fd, _LEN.size, deadline, who))
    return _decode(_recv_exact(fd, n, deadline, who))


class GraphWorker:
    """A child process holding one ONNX Runtime session of the graph ``path``:
    :meth:`run` sends it feeds and returns ``{output name: array}``. Any failure (the child
    dies, answers an error, or takes longer than ``timeout_s`` for one request, when it is
    killed) raises :class:`ParityError` naming the graph, with the end of the child's stderr.
    ``peak_rss_bytes``: the child's peak resident memory, as it last reported it."""

    def __init__(self, name: str, path: str | os.PathLike, threads: int = 0,
                 timeout_s: float = WORKER_TIMEOUT_S, command: Sequence[str] = WORKER_COMMAND):
        self.name, self.timeout_s, self.peak_rss_bytes = name, timeout_s, 0
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - the child's, until close()
        self.stderr_tail = ""
        self._proc = subprocess.Popen(list(command), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self._stderr)
        self._request({"path": str(path), "threads": threads}, {})  # answered once the session is loaded

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._request({}, feeds)

    def _request(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        who = f"the parity worker of graph '{self.name}' (pid {self._proc.pid})"
        deadline = time.monotonic() + self.timeout_s
        try:
            _send(self._proc.stdin.fileno(), meta, arrays, deadline, who)
            reply, payload = _recv(self._proc.stdout.fileno(), deadline, who)
        except (TimeoutError, EOFError, BrokenPipeError, ValueError) as e:  # ValueError: a garbled message
            self.close(kill=True)
            tail = f"; its stderr ends:\n{self.stderr_tail}" if self.stderr_tail else ""
            raise ParityError(f"{e} (exit code {self._proc.returncode}){tail}") from None
        self.peak_rss_bytes = max(self.peak_rss_bytes, int(reply.get("peak", 0)))
        if reply.get("error") is not None:
            self.close(kill=True)
            raise ParityError(f"{who} failed:\n{reply['error']}")
        return payload

    def close(self, kill: bool = False) -> None:
        """End the child: closing its input ends it; one that does not end within 10 s (or
        any, with ``kill``: a worker that failed or hung) is killed."""
        if kill:
            self._proc.kill()
        if self._proc.poll() is None:
            for stream in (self._proc.stdin,):
                with contextlib.suppress(OSError):
                    stream.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        for stream in (self._proc.stdin, self._proc.stdout):
            with contextlib.suppress(OSError):
                stream.close()
        if not self._stderr.closed:
            self._stderr.seek(0)
            self.stderr_tail = self._stderr.read().decode(errors="replace")[-4000:].strip()
            self._stderr.close()


class WorkerRunner:
    """A graph runner (``run(graph, feeds) -> outputs``, as :mod:`vpp_edge.runtime.predict_step`
    takes) over ``paths`` ``{graph: onnx path}`` with at most one worker alive: asking for
    another graph ends the current worker first, so no two sessions are ever held at once.
    ``on_open(graph, worker)`` is called each time a graph's worker has started.
    ``peaks``: each graph's worker peak resident memory."""

    def __init__(self, paths: dict[str, Any], threads: int = 0, timeout_s: float = WORKER_TIMEOUT_S,
                 on_open: Callable[[str, GraphWorker], None] | None = None,
                 command: Sequence[str] = WORKER_COMMAND):
        self.paths, self.threads, self.timeout_s, self.on_open, self.command = paths, threads, timeout_s, on_open, command
        self.peaks: dict[str, int] = {}
        self._worker: GraphWorker | None = None

    def open(self, graph: str) -> GraphWorker:
        if self._worker is None or self._worker.name != graph:
            self.close()
            log.info("parity: starting the worker of graph %s", graph)
            self._worker = GraphWorker(graph, self.paths[graph], self.threads, self.timeout_s, self.command)
            if self.on_open is not None:
                self.on_open(graph, self._worker)
        return self._worker

    def __call__(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.open(graph).run(feeds)

    def close(self) -> None:
        if self._worker is not None:
            worker, self._worker = self._worker, None
            worker.close()
            self.peaks[worker.name] = max(self.peaks.get(worker.name, 0), worker.peak_rss_bytes)

    def __enter__(self) -> WorkerRunner:  # noqa: PYI034 (typing.Self is 3.11+)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def feeds(graph: str, ref: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inputs of ``graph`` from a reference run's arrays (the robot state only where the
    reference holds one: policies that take it)."""
    return {name: ref[name] for name in GRAPHS[graph].inputs_for(STATE_INPUT in ref)}


def state(ref: dict[str, np.ndarray]) -> np.ndarray | None:
    return ref.get(STATE_INPUT)


def chain(run: Callable, ref: dict[str, np.ndarray], sigmas: list[float], mode: str) -> np.ndarray:
    """The action chunk the graphs produce end to end, as the runtime chains them."""
    out = run("text", feeds("text", ref))
    return predict_actions(run, out["condition"], out["goal"], ref["frames"], ref["noise"], ref["action_noise"],
                           sigmas, mode, state=state(ref))


def evaluate_precision(precision: str, paths: dict[str, Any], refs: list[dict[str, np.ndarray]],
                       sigmas: list[float], mode: str, scale: np.ndarray, offset: np.ndarray, gates: dict,
                       threads: int = 0, timeout_s: float = WORKER_TIMEOUT_S,
                       command: Sequence[str] = WORKER_COMMAND) -> dict:
    """Per-graph figures (each graph fed the PyTorch inputs of ``refs``, numpy arrays of the
    reference run) and the chained action chunk, with the graphs ``paths`` run in workers.

    Each graph's worker, when it starts, first runs every reference's inputs; the chain then
    reuses the worker it finds open, so with one parity sample every graph is loaded once."""
    got: dict[str, list[dict[str, np.ndarray]]] = {}

    def per_graph(graph: str, worker: GraphWorker) -> None:
        if graph not in got:
            got[graph] = [worker.run(feeds(graph, ref)) for ref in refs]

    with WorkerRunner(paths, threads, timeout_s, per_graph, command) as run:
        chained = [chain(run, ref, sigmas, mode) for ref in refs]
        for graph in GRAPHS:  # the graphs of the other action mode
            run.open(graph)
    graphs = {name: {o: worst([compare(ref[o], g[o]) for ref, g in zip(refs, got[name])]) for o in gdef.outputs}
              for name, gdef in GRAPHS.items()}
    actions = worst([compare(ref["actions"], c) for ref, c in zip(refs, chained)])
    denorm = worst([compare(ref["actions_denormalized"], c * scale + offset) for ref, c in zip(refs, chained)])
    kind = precision_spec(precision).gate
    gate, ok = action_gate(kind, actions, gates)
    if kind == "fp32":  # the reference: every graph is gated too
        gate += f", every graph >= {gates['fp32_graph_cosine']}"
        for outputs in graphs.values():
            for s in outputs.values():
                s["gate"] = "pass" if passes(s, gates["fp32_graph_cosine"]) else "FAIL"
                ok = ok and s["gate"] == "pass"
    return {"graphs": graphs, "actions": actions, "actions_denormalized": denorm, "gate": gate, "passed": bool(ok),
            "worker_peak_rss_bytes": run.peaks}


def _worker_main() -> int:
    """The worker's loop: load the session the first message names, answer each feeds
    message with the outputs, end at the end of its input."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; Ctrl-C reaches it too
    with contextlib.suppress(OSError, AttributeError):  # Linux: die with the parent
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    out = os.dup(1)
    os.dup2(2, 1)  # stray prints go to stderr, never into the answers
    from .onnx_io import session
    from .phases import map_large_allocations

    map_large_allocations()  # a session without its arena frees layer-sized blocks: unmapped, not kept in the heap

    def peak() -> int:
        """VmHWM: this process image's peak (getrusage's would carry the forking parent's over exec)."""
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), 0)

    sess = None
    while True:
        try:
            meta, feeds_ = _recv(0, None, "the parent")
        except EOFError:
            return 0
        answer: dict[str, np.ndarray] = {}
        error = None
        try:
            if sess is None:
                sess = session(Path(meta["path"]), meta["threads"], lean=True)  # memory over speed
            else:
                values = sess.run(None, feeds_)
                answer = {o.name: v for o, v in zip(sess.get_outputs(), values)}
        except Exception:  # noqa: BLE001 - every failure goes back to the parent, as text
            error = traceback.format_exc()
        _send(out, {"error": error, "peak": peak()}, answer, time.monotonic() + WORKER_TIMEOUT_S, "the parent")


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    sys.exit(_worker_main())
