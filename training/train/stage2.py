"""Stage 2: train the Video Former and the diffusion action head on frozen TVP features.

The objective is the official one: EDM denoising of the normalised action chunk with
noise levels from a truncated log-logistic density (loc = log(sigma_data), scale 0.5,
[sigma_min, sigma_max]); AdamW (betas 0.9/0.9, weight decay 0.05), warm-up then cosine
decay, an EMA of the weights, and validation by sampling chunks with the deployed DDIM
sampler. Checkpoints are ordinary vpp-edge checkpoints (EMA weights), so ``vpp export
--checkpoint`` and ``vpp predict --checkpoint`` take them as they are.

A preset that takes the robot state (``action_head.use_proprio``, the official XBot) is
trained as VPP_policy_xbot.py: each sample's recorded state, bound-normalised with the
training episodes' 1st / 99th percentiles (``state_01`` / ``state_99``), enters the action
head's encoder as its last token; with ``action_base`` 'state' the targets are the chunks
relative to that state (xbot_dataset.py). The state bounds travel in the checkpoint.

Runs in one process or under ``accelerate launch`` / torchrun (DDP); see common.py for
why N processes train the same model as one.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from diffusers.training_utils import EMAModel
from torch import nn
from tqdm.auto import tqdm

from vpp_edge.normalization import ActionNormalizer

from ..checkpoints import save_checkpoint
from ..data.checks import BadDataReport, load_sources
from ..data.datasets import PolicyDataset, split_episodes
from ..data.stats import STATS_FILE, fit_statistics, load_statistics, save_statistics, state_normalizer
from ..models.edm import sample_log_logistic
from ..models.policy import VPPPolicy
from .common import (cpu_threads, initial_policy, local_slice, open_run, set_lr,
                     step_generator, stream_seed)
from .config import TrainConfig
from .features import CachedPolicyDataset, FeatureCache, sample_noise, tvp_features
from .loop import LossLog, ema_applied, finish_run, make_optimizer, mixture_loader, resume_step, update
from .metrics import MetricsLog
from .state import STATE_DIR, latest_checkpoint, save_training_state, write_checkpoint

log = logging.getLogger(__name__)

# Parts of the action head the official trainers freeze: goal_emb and pos_emb, which the VPP
# forward pass never uses, and proprio_emb, which VPP_policy_xbot.py freezes at its
# initialisation even though it feeds the state through it (the encoder learns to read it).
UNUSED_PREFIXES = ("action_head.inner_model.goal_emb.", "action_head.inner_model.proprio_emb.",
                   "action_head.inner_model.pos_emb")


class PolicyHead(nn.Module):
    """The trained part of stage 2 (shares its parameters with the policy): Former + action head.

    ``forward`` returns the EDM loss of a batch; parameter names match the policy's.
    """

    def __init__(self, policy: VPPPolicy):
        super().__init__()
        self.former = policy.former
        self.action_head = policy.action_head

    def forward(self, features: torch.Tensor, goal: torch.Tensor, actions: torch.Tensor, noise: torch.Tensor,
                sigma: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
        return self.action_head.loss(self.former(features), goal, actions, noise, sigma, state)


def training_sigmas(policy: VPPPolicy, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Noise levels [batch] from the official log-logistic density."""
    cfg = policy.preset.action_head
    return sample_log_logistic((batch,), loc=math.log(cfg.sigma_data), scale=0.5, min_value=cfg.sigma_min,
                               max_value=cfg.sigma_max, generator=generator)


class _Validator:
    """Action error of the current (EMA) weights on fixed held-out observations and noise."""

    def __init__(self, policy: VPPPolicy, items: Any, cached: bool, seed: int, batch: int, device: torch.device):
        self.policy, self.items, self.cached, self.seed = policy, items, cached, seed
        self.batch, self.device = batch, device
        scale, offset = policy.normalizer.scale_offset(policy.preset.action_dim)
        self.scale = torch.from_numpy(scale).to(device)

    @torch.no_grad()
    def __call__(self) -> dict[str, float]:
        policy, n = self.policy, len(self.items)
        se = ae = count = 0.0
        for start in range(0, n, self.batch):
            rows = list(range(start, min(n, start + self.batch)))
            items = [self.items[i] for i in rows]
            actions = torch.stack([it["actions"] for it in items]).to(self.device)
            if self.cached:
                feats = torch.stack([it["features"] for it in items]).to(self.device)
                goal = torch.stack([it["goal"] for it in items]).to(self.device)
            else:
                noise = torch.stack([sample_noise(policy, self.seed, i) for i in rows]).to(self.device)
                feats, goal = tvp_features(policy, torch.stack([it["frames"] for it in items]).to(self.device),
                                           torch.stack([it["input_ids"] for it in items]).to(self.device),
                                           torch.stack([it["attention_mask"] for it in items]).to(self.device), noise)
            gen = torch.Generator().manual_seed(stream_seed(self.seed, start, "val-action"))
            action_noise = torch.randn(actions.shape, generator=gen).to(self.device)
            state = torch.stack([it["state"] for it in items]).to(self.device) if "state" in items[0] else None
            pred = policy.sample_actions(policy.former(feats), goal, action_noise, state)
            err = pred - actions
            se += float(err.pow(2).sum())
            ae += float((err.abs() * self.scale).sum())  # robot units: the normalisation's scale
            count += err.numel()
        return {"val/action_mse": se / count, "val/action_mae": ae / count}


def _val_stride(episodes: list, want: int) -> int:
    steps = sum(e.num_steps for e in episodes)
    return max(1, steps // max(1, want))


def train_policy(cfg: TrainConfig, run: str | Path, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train stage 2 into the run folder ``run``; returns the summary (also ``summary.json``).

    ``resume`` continues from the run's last checkpoint (weights, optimizer, EMA, step).
    """
    with cpu_threads(cfg.threads):
        return _train_policy(cfg, run, resume, progress)


def _train_policy(cfg: TrainConfig, run: str | Path, resume: bool, progress: bool) -> dict[str, Any]:
    run = Path(run)
    accelerator, main, previous = open_run(cfg, run, resume)
    device = accelerator.device

    policy, tokenizer, init_source = initial_policy(cfg, cfg.resolve_preset())
    preset = policy.preset
    report = BadDataReport()
    episodes = load_sources(list(cfg.data.sources), preset.num_views, preset.action_dim, cfg.data.bad_data, report,
                            progress=progress and main)
    train_eps, val_eps = split_episodes(episodes, cfg.data.val_fraction)
    if resume and (run / STATS_FILE).is_file():
        stats = load_statistics(run)  # computed once, at the start of the run
    else:
        stats = fit_statistics(train_eps, cfg.data.normalization, cfg.data.quantile, preset.action_base,
                               preset.action_horizon, cfg.data.action_stride)
        if main:
            save_statistics(stats, run)
    policy.set_normalizer(ActionNormalizer.from_dict(stats["actions"]))
    if preset.action_head.use_proprio:
        policy.set_state_normalizer(state_normalizer(stats, preset.action_head.proprio_dim, preset.name))
    policy.requires_grad_(False)
    policy.to(device).eval()
    head = PolicyHead(policy)
    for name, p in head.named_parameters():
        p.requires_grad_(not name.startswith(UNUSED_PREFIXES))
    trainable = [p for p in head.parameters() if p.requires_grad]

    data_args = dict(num_views=preset.num_views, image_size=preset.image_size, horizon=preset.action_horizon,
                     normalizer=policy.normalizer, tokenizer=tokenizer, action_stride=cfg.data.action_stride,
                     cache_episodes=cfg.data.cache_episodes, state_normalizer=policy.state_normalizer,
                     action_base=preset.action_base)
    train_ds = PolicyDataset(train_eps, sample_stride=cfg.data.sample_stride, **data_args)
    val_ds = (PolicyDataset(val_eps, sample_stride=_val_stride(val_eps, cfg.policy.val_samples), **data_args)
              if val_eps else None)
    cache_seed = cfg.seed
    train_items: Any = train_ds
    val_items: Any = val_ds
    if cfg.policy.feature_cache:
        build = dict(root=run / "cache", seed=cache_seed, batch=cfg.policy.cache_batch, dtype=cfg.policy.feature_dtype,
                     accelerator=accelerator, progress=progress)
        train_items = CachedPolicyDataset(train_ds, FeatureCache.build(policy, train_ds, name="train", **build))
        if val_ds is not None:
            val_items = CachedPolicyDataset(val_ds, FeatureCache.build(policy, val_ds, name="val", **build))

    optimizer, ema = make_optimizer(cfg, trainable)
    start = resume_step(cfg, run, previous, resume, head, optimizer, ema)
    weights = [cfg.data.sources[i].weight for i in train_ds.source_indices]
    batch = cfg.batch_size
    sampler, loader = mixture_loader(cfg, train_items, train_ds.source_sizes, weights, start)
    head_ddp, optimizer, loader = accelerator.prepare(head, optimizer, loader)

    validator = (_Validator(policy, val_items, cfg.policy.feature_cache, cfg.seed, batch, device)
                 if val_items is not None and main else None)
    metrics = MetricsLog(run, enabled=main)
    loss_seed = cfg.seed if cfg.policy.loss_seed is None else cfg.policy.loss_seed
    if main:
        log.info("stage 2: %d train samples (%d episodes), %d val samples; mixture %s; %d process(es); init: %s",
                 len(train_ds), len(train_eps), len(val_ds) if val_ds else 0,
                 dict(zip([cfg.data.sources[i].label for i in train_ds.source_indices],
                          [round(r, 3) for r in sampler.ratios])), accelerator.num_processes, init_source)

    def save(step: int) -> Path:
        meta = {"step": step, "stage": "policy", "seed": cfg.seed, "config": cfg.to_dict(),
                "world_size": accelerator.num_processes}

        def write(folder: Path) -> None:
            with ema_applied(ema, trainable, head):
                save_checkpoint(policy, tokenizer, folder, extra={"training": {
                    "stage": "policy", "step": step, "ema": ema is not None, "init": init_source,
                    "state_normalization": stats.get("states"), "skipped_episodes": len(report)}})
            save_training_state(folder / STATE_DIR, head.state_dict(), optimizer, ema, meta)

        return write_checkpoint(run, step, write, cfg.keep_checkpoints)

    bar = tqdm(total=cfg.steps, initial=start, desc="stage 2 (policy)", disable=not (progress and main))
    losses = LossLog(metrics, bar, cfg)
    val_metrics: dict[str, float] = {}
    first_val: dict[str, float] = {}
    step = start
    if validator is not None and start == 0:  # the untrained reference
        first_val = _validate(validator, head, ema, trainable)
        metrics.log(0, first_val)
    started = time.perf_counter()
    head_ddp.train()
    for batch_data in loader:
        lr = set_lr(optimizer, step, cfg.steps, cfg.optim)
        actions = batch_data["actions"]
        if cfg.policy.feature_cache:
            features, goal = batch_data["features"], batch_data["goal"]
        else:
            tvp_shape = policy.noise_shapes(batch)[0]
            tvp_noise = local_slice(torch.randn(tvp_shape, generator=step_generator(cfg.seed, step, "tvp")),
                                    accelerator).to(device)
            with accelerator.autocast():
                features, goal = tvp_features(policy, batch_data["frames"], batch_data["input_ids"],
                                              batch_data["attention_mask"], tvp_noise)
        gen = step_generator(loss_seed, step, "action")
        noise = local_slice(torch.randn((batch, *actions.shape[1:]), generator=gen), accelerator).to(device)
        sigma = local_slice(training_sigmas(policy, batch, gen), accelerator).to(device)
        torch.manual_seed(stream_seed(cfg.seed, step, f"dropout-{accelerator.process_index}"))
        with accelerator.autocast():
            loss = head_ddp(features, goal, actions, noise, sigma, batch_data.get("state"))
        reduced = update(accelerator, loss, trainable, optimizer, ema, cfg.optim.grad_clip)
        step += 1
        losses.add(step, reduced, lr)
        if validator is not None and (step % cfg.val_every == 0 or step == cfg.steps):
            val_metrics = _validate(validator, head, ema, trainable)
            metrics.log(step, val_metrics)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            if main:
                save(step)
            accelerator.wait_for_everyone()
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - started
    summary = {"stage": "policy", "steps": step, "start_step": start, "seconds": round(seconds, 2), **val_metrics,
               **{f"{k}@0": v for k, v in first_val.items()}, "train_samples": len(train_ds),
               "val_samples": len(val_ds) if val_ds else 0,
               "processes": accelerator.num_processes, "skipped_episodes": report.skipped,
               "checkpoint": str(latest_checkpoint(run)), "init": init_source}
    return finish_run(run, summary, losses, metrics, main, accelerator, "stage 2")


def _validate(validator: _Validator, head: PolicyHead, ema: EMAModel | None, trainable: list) -> dict[str, float]:
    with ema_applied(ema, trainable, head):
        return validator()
