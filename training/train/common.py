"""Pieces both stages share: the accelerate set-up, the learning-rate schedule, the
per-step random streams, and the starting weights.

Randomness is a function of (seed, step) and never of the process layout: each step's
noise is drawn for the whole global batch and every process takes its slice, so one
process and N processes (same global batch) train the same model, and a resumed run
continues exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from pathlib import Path
from typing import Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration

from vpp_edge.errors import VPPError
from vpp_edge.presets import Preset
from vpp_edge.tokenizer import InstructionTokenizer

from ..models.policy import VPPPolicy
from .config import OptimConfig, TrainConfig

log = logging.getLogger(__name__)


@contextlib.contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """Use ``n`` torch CPU threads (0: leave as is) for the block, then restore."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def make_accelerator(cfg: TrainConfig, log_dir: Path | None = None) -> Accelerator:
    """An Accelerator for ``accelerate launch`` / torchrun / a plain process.

    ``split_batches``: the data loader yields the *global* batch and each process keeps its
    slice, so the batch (and the model it trains) does not depend on the process count.
    Without CUDA, distributed runs use gloo on the CPU.
    """
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision,
                       dataloader_config=DataLoaderConfiguration(split_batches=True),
                       project_dir=str(log_dir) if log_dir else None)


def lr_scale(step: int, total: int, opt: OptimConfig) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up from ``warmup_start_scale`` to 1,
    then cosine decay to ``min_lr_scale`` at ``total``."""
    if step < opt.warmup_steps:
        return opt.warmup_start_scale + (1 - opt.warmup_start_scale) * step / max(1, opt.warmup_steps)
    span = max(1, total - opt.warmup_steps)
    progress = min(1.0, (step - opt.warmup_steps) / span)
    return opt.min_lr_scale + (1 - opt.min_lr_scale) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, step: int, total: int, opt: OptimConfig) -> float:
    lr = opt.lr * lr_scale(step, total, opt)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def stream_seed(seed: int, step: int, purpose: str) -> int:
    """A 63-bit seed for one purpose at one step (stable across Python runs)."""
    digest = hashlib.sha256(f"{seed}:{step}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def step_generator(seed: int, step: int, purpose: str) -> torch.Generator:
    return torch.Generator().manual_seed(stream_seed(seed, step, purpose))


def local_slice(global_tensor: torch.Tensor, accelerator: Accelerator) -> torch.Tensor:
    """This process's rows of a tensor drawn for the global batch (split_batches order)."""
    n = global_tensor.shape[0] // accelerator.num_processes
    i = accelerator.process_index
    return global_tensor[i * n:(i + 1) * n]


def open_run(cfg: TrainConfig, run: Path, resume: bool) -> tuple[Accelerator, bool, Path | None]:
    """The accelerator for a run folder, whether this is the main process, and the run's
    last checkpoint. Refuses to write over a run's checkpoints unless resuming; the main
    process saves the config."""
    from .config import save_config
    from .state import latest_checkpoint

    accelerator = make_accelerator(cfg)
    check_batch(cfg, accelerator)
    main = accelerator.is_main_process
    previous = latest_checkpoint(run)
    if previous is not None and not resume:
        raise VPPError(f"{run} already holds checkpoints (last: {previous.name}); pass --resume to continue "
                       "or choose another output folder")
    if main:
        run.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run / "train_config.yaml")
    accelerator.wait_for_everyone()
    return accelerator, main, previous


def check_batch(cfg: TrainConfig, accelerator: Accelerator) -> None:
    if cfg.batch_size % accelerator.num_processes:
        raise VPPError(f"batch_size {cfg.batch_size} must divide by the {accelerator.num_processes} processes "
                       "(it is the global batch, split across them)")


def initial_policy(cfg: TrainConfig, preset: Preset) -> tuple[VPPPolicy, InstructionTokenizer, str]:
    """The starting weights named by ``cfg.init`` (see :class:`TrainConfig`), and a description."""
    from ..checkpoints import load_checkpoint, load_official
    from ..models import build_policy

    init = dict(cfg.init)
    if "checkpoint" in init:
        policy, tokenizer = load_checkpoint(init["checkpoint"])
        return policy, tokenizer, f"checkpoint {init['checkpoint']}"
    if "tvp" in init:
        init.setdefault("video_model", init["tvp"])
        init.setdefault("clip", str(Path(init["tvp"]) / "clip"))
    if "video_model" in init or "clip" in init:
        if not ("video_model" in init and "clip" in init):
            raise VPPError("init needs both video_model and clip (or tvp: a stage-1 output folder)")
        policy, tokenizer = load_official(preset, init["video_model"], init["clip"], init.get("action_model"))
        return policy, tokenizer, f"video model {init['video_model']}, CLIP {init['clip']}"
    policy, tokenizer = build_policy(preset, seed=cfg.seed)
    return policy, tokenizer, f"random '{preset.name}' weights (seed {cfg.seed})"
