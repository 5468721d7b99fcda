"""The parts of the training loop both stages share: optimizer + EMA, resuming, the
mixture-sampled loader, one update, EMA weights swapped in for evaluation, the running
loss log and the run summary."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from torch import nn
from torch.utils.data import DataLoader

from vpp_edge.errors import VPPError

from ..data.mixture import MixtureSampler
from .config import TrainConfig
from .state import STATE_DIR, load_training_state

log = logging.getLogger(__name__)


def make_optimizer(cfg: TrainConfig, trainable: list[nn.Parameter]) -> tuple[torch.optim.AdamW, EMAModel | None]:
    """AdamW over ``trainable`` and, when configured, an EMA of them."""
    optimizer = torch.optim.AdamW(trainable, lr=cfg.optim.lr, betas=cfg.optim.betas,
                                  weight_decay=cfg.optim.weight_decay, eps=cfg.optim.eps)
    ema = (EMAModel(trainable, decay=cfg.ema.decay, use_ema_warmup=cfg.ema.warmup, power=cfg.ema.power)
           if cfg.ema.enabled else None)
    return optimizer, ema


def resume_step(cfg: TrainConfig, run: Path, previous: Path | None, resume: bool, module: nn.Module,
                optimizer: torch.optim.Optimizer, ema: EMAModel | None) -> int:
    """The step to start from: 0, or the last checkpoint's (weights, optimizer and EMA restored)."""
    start = 0
    if resume and previous is not None:
        start = int(load_training_state(previous / STATE_DIR, module, optimizer, ema)["step"])
        log.info("resuming from %s (step %d)", previous, start)
    if start >= cfg.steps:
        raise VPPError(f"{run}: already trained {start} steps (steps: {cfg.steps}); raise steps to continue")
    return start


def mixture_loader(cfg: TrainConfig, items, source_sizes: Sequence[int], weights: Sequence[float],
                   start: int) -> tuple[MixtureSampler, DataLoader]:
    """Batches for steps ``start .. cfg.steps``, sources drawn by weight (resumes mid-stream)."""
    batch = cfg.batch_size
    sampler = MixtureSampler(source_sizes, weights, (cfg.steps - start) * batch, seed=cfg.seed, offset=start * batch)
    loader = DataLoader(items, batch_size=batch, sampler=sampler, num_workers=cfg.num_workers, drop_last=True,
                        persistent_workers=cfg.num_workers > 0)
    return sampler, loader


def update(accelerator: Accelerator, loss: torch.Tensor, trainable: list[nn.Parameter],
           optimizer: torch.optim.Optimizer, ema: EMAModel | None, grad_clip: float) -> float:
    """Backward, clip, step, EMA; returns the loss averaged over processes."""
    accelerator.backward(loss)
    if grad_clip > 0:
        accelerator.clip_grad_norm_(trainable, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        ema.step(trainable)
    return float(accelerator.reduce(loss.detach().float(), "mean"))


@contextlib.contextmanager
def ema_applied(ema: EMAModel | None, trainable: list[nn.Parameter], module: nn.Module) -> Iterator[None]:
    """Evaluate or save with the EMA weights and ``module`` in eval mode; training resumes after."""
    if ema is not None:
        ema.store(trainable)
        ema.copy_to(trainable)
    module.eval()
    try:
        yield
    finally:
        module.train()
        if ema is not None:
            ema.restore(trainable)


class LossLog:
    """Training loss averaged over ``log_every`` steps, to the metrics log and the progress bar."""

    def __init__(self, metrics, bar, cfg: TrainConfig):
        self.metrics, self.bar, self.cfg = metrics, bar, cfg
        self.window: list[float] = []
        self.first: float | None = None
        self.last = float("nan")

    def add(self, step: int, loss: float, lr: float) -> None:
        self.window.append(loss)
        if step % self.cfg.log_every == 0 or step == self.cfg.steps:
            self.last = float(np.mean(self.window))
            self.first = self.last if self.first is None else self.first
            self.metrics.log(step, {"train/loss": self.last, "train/lr": lr})
            self.bar.set_postfix(loss=f"{self.last:.4f}", lr=f"{lr:.2e}")
            self.window = []


def finish_run(run: Path, summary: dict[str, Any], losses: LossLog, metrics, main: bool, accelerator: Accelerator,
               label: str) -> dict[str, Any]:
    """Plot the metrics, write ``summary.json`` and log the outcome (main process); returns ``summary``."""
    summary = {**summary, "loss_first": losses.first, "loss_last": losses.last}
    if main:
        metrics.plot()
        (run / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        log.info("%s done: %d steps in %.1f s, loss %.4f -> %.4f; checkpoint %s", label,
                 summary["steps"] - summary["start_step"], summary["seconds"], losses.first or float("nan"),
                 losses.last, summary["checkpoint"])
    metrics.close()
    accelerator.wait_for_everyone()
    return summary
