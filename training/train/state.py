"""Resumable training state, without pickle: tensors in safetensors, the rest in JSON.

A run folder holds ``checkpoints/step-NNNNNNN/`` (each a complete checkpoint that the
rest of vpp-edge loads, plus ``training_state/``) and ``last``, a link to the newest.
``training_state/`` has the raw (non-EMA) trained weights, the optimizer moments, the
EMA weights and ``state.json`` (step, config, ...).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from vpp_edge.errors import CheckpointError
from vpp_edge.files import atomic_dir, read_json

log = logging.getLogger(__name__)

STATE_DIR = "training_state"
CHECKPOINTS = "checkpoints"
LAST = "last"


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for pid, entries in state["state"].items():
        plain["state"][str(pid)] = {}
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{name}"] = value.detach().contiguous().cpu()
                plain["state"][str(pid)][name] = {"tensor": f"{pid}.{name}"}
            else:
                plain["state"][str(pid)][name] = {"value": value}
    return tensors, plain


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for pid, entries in plain["state"].items():
        state[int(pid)] = {name: tensors[e["tensor"]] if "tensor" in e else e["value"] for name, e in entries.items()}
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in plain["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_training_state(folder: Path, weights: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                        ema: Any | None, meta: dict[str, Any]) -> None:
    """Write ``folder`` (created) with weights, optimizer, EMA and ``state.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(folder / "weights.safetensors"))
    tensors, plain = _flatten_optimizer(optimizer.state_dict())
    save_file(tensors, str(folder / "optimizer.safetensors"))
    meta = {**meta, "optimizer": plain}
    if ema is not None:
        ema_state = ema.state_dict()
        save_file({str(i): p.detach().contiguous().cpu() for i, p in enumerate(ema_state["shadow_params"])},
                  str(folder / "ema.safetensors"))
        meta["ema"] = {k: v for k, v in ema_state.items() if k != "shadow_params"}
    (folder / "state.json").write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")


def load_training_state(folder: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        ema: Any | None) -> dict[str, Any]:
    """Restore what :func:`save_training_state` wrote; returns ``state.json``."""
    meta = read_json(folder / "state.json", CheckpointError, "not a resumable training checkpoint")
    try:
        weights = load_file(str(folder / "weights.safetensors"))
        module.load_state_dict(weights, strict=True)
        optimizer.load_state_dict(_unflatten_optimizer(load_file(str(folder / "optimizer.safetensors")),
                                                       meta["optimizer"]))
        if ema is not None:
            if "ema" not in meta:
                raise CheckpointError(f"{folder}: no EMA state (the run was trained without EMA)")
            shadow = load_file(str(folder / "ema.safetensors"))
            ema.load_state_dict({**meta["ema"], "shadow_params": [shadow[str(i)] for i in range(len(shadow))]})
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{folder}: cannot restore the training state ({exc})") from None
    return meta


def checkpoint_dir(run: Path, step: int) -> Path:
    return run / CHECKPOINTS / f"step-{step:07d}"


def write_checkpoint(run: Path, step: int, write: Callable[[Path], None], keep: int) -> Path:
    """Write ``checkpoints/step-N`` atomically with ``write(tmp_folder)``, point ``last`` at
    it, and keep only the newest ``keep`` step folders."""
    target = checkpoint_dir(run, step)
    with atomic_dir(target) as tmp:
        write(tmp)
    link = run / LAST
    tmp_link = run / f".{LAST}.tmp"
    if tmp_link.is_symlink() or tmp_link.exists():
        tmp_link.unlink()
    os.symlink(os.path.relpath(target, run), tmp_link)
    os.replace(tmp_link, link)
    steps = sorted((run / CHECKPOINTS).glob("step-*"))
    for old in steps[: max(0, len(steps) - max(1, keep))]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(run: Path) -> Path | None:
    """The checkpoint ``last`` points at (or the highest step folder)."""
    link = run / LAST
    if link.exists() and (link / STATE_DIR).is_dir():
        return link.resolve()
    steps = sorted(p for p in (run / CHECKPOINTS).glob("step-*") if (p / STATE_DIR).is_dir())
    return steps[-1] if steps else None
