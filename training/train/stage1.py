"""Stage 1: fine-tune the TVP video model (the SVD UNet with language cross-attention).

The objective and noise schedule are the official stage-1 ones (``step1_train_svd.py``):
VAE latents scaled by the VAE's scaling factor; noise levels log(sigma) ~ N(0.7, 1.6);
EDM scalings c_in = 1/sqrt(s^2+1), c_skip = 1/(s^2+1), c_out = -s/sqrt(s^2+1)
(v-prediction, as SVD's Euler scheduler), c_noise = log(s)/4 as the UNet's timestep;
loss = mean of (s^2+1)/s^2 * (x0_hat - x0)^2. The first frame conditions every frame
(its unscaled latent is concatenated on channels), with noise augmentation
exp(N(-3, 0.5)) on the pixels, recorded in the added time ids; the CLIP text
condition is dropped to zeros 5% of the time.

Checkpoints are diffusers folders (``unet/``, ``vae/``, ``scheduler/``) plus ``clip/``
(CLIP text tower + tokenizer.json): what :func:`vpp_edge.training.checkpoints.load_official`
and ``vpp predict --video-model DIR --clip DIR/clip`` read, and stage 2's
``init: {tvp: DIR}``. Prediction previews (ground truth above, prediction below) are
written as GIFs to ``samples/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import EulerDiscreteScheduler
from PIL import Image
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from vpp_edge.errors import VPPError

from ..checkpoints import _quiet_hf  # no per-file progress bars inside the training bar
from ..data.checks import BadDataReport, load_sources
from ..data.datasets import ClipDataset, split_episodes
from ..models.policy import VPPPolicy
from .common import (cpu_threads, initial_policy, local_slice, open_run, set_lr,
                     step_generator)
from .config import TrainConfig
from .features import frames_to_input
from .loop import LossLog, ema_applied, finish_run, make_optimizer, mixture_loader, resume_step, update
from .metrics import MetricsLog
from .state import STATE_DIR, latest_checkpoint, save_training_state, write_checkpoint

log = logging.getLogger(__name__)

PRESET_FILE = "vpp_preset.json"


def edm_scalings(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_skip, c_out, c_in, c_noise) of the official stage-1 objective for sigma [B]."""
    var = sigma**2 + 1
    return 1 / var, -sigma / var.sqrt(), 1 / var.sqrt(), sigma.log() / 4


class TVPDenoiser(nn.Module):
    """The trained part of stage 1 (the UNet); ``forward`` returns the weighted EDM loss.

    ``latents``: clean clip latents [B, F, C, h, w] (scaled); ``image_latent``: the
    conditioning frame's latent [B, C, h, w] (unscaled, as the TVP feeds it at run time).
    """

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, latents: torch.Tensor, image_latent: torch.Tensor, condition: torch.Tensor,
                added_time_ids: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        c_skip, c_out, c_in, c_noise = edm_scalings(sigma)
        shape = (-1, 1, 1, 1, 1)
        noisy = latents + noise * sigma.view(shape)
        frames = latents.shape[1]
        sample = torch.cat([noisy * c_in.view(shape), image_latent.unsqueeze(1).expand(-1, frames, -1, -1, -1)], dim=2)
        pred = self.unet(sample, c_noise, encoder_hidden_states=condition, added_time_ids=added_time_ids).sample
        denoised = pred * c_out.view(shape) + noisy * c_skip.view(shape)
        weight = (sigma**2 + 1) / sigma**2
        return ((denoised - latents) ** 2 * weight.view(shape)).mean()


def encode_latents(policy: VPPPolicy, frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames [..., S, S, 3] -> unscaled VAE latents (posterior mode) [..., C, h, w]."""
    lead = frames.shape[:-3]
    x = frames_to_input(frames.reshape(-1, *frames.shape[-3:])).to(policy.tvp.vae.dtype)
    lat = policy.tvp.encode_images(x)
    return lat.reshape(*lead, *lat.shape[1:])


class LatentCache:
    """VAE latents (scaled) of every frame of every (episode, view), one ``.npy`` each."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._open: dict[tuple[int, int], np.ndarray] = {}

    def path(self, episode: int, view: int) -> Path:
        return self.folder / f"e{episode:06d}_v{view}.npy"

    def get(self, episode: int, view: int) -> np.ndarray:
        key = (episode, view)
        if key not in self._open:
            self._open[key] = np.load(self.path(episode, view), mmap_mode="r")
        return self._open[key]

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder, "_open": {}}

    @classmethod
    @torch.no_grad()
    def build(cls, policy: VPPPolicy, dataset: ClipDataset, root: Path, name: str, accelerator, progress: bool,
              batch: int = 16) -> "LatentCache":
        folder = Path(root) / f"latents-{name}-{_latent_fingerprint(policy, dataset)}"
        scale = policy.tvp.vae.config.scaling_factor
        views = sorted({(s.episode, s.view) for s in dataset.samples})
        cache = cls(folder)
        if accelerator.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        mine = [v for i, v in enumerate(views) if i % accelerator.num_processes == accelerator.process_index]
        for e, v in tqdm(mine, desc=f"VAE latents ({name})", disable=not (progress and accelerator.is_main_process)):
            if cache.path(e, v).is_file():
                continue
            frames = torch.from_numpy(dataset.frames.view(e, v))
            lat = torch.cat([encode_latents(policy, frames[i:i + batch].to(accelerator.device)).float().cpu()
                             for i in range(0, len(frames), batch)]) * scale
            tmp = cache.path(e, v).with_suffix(".tmp.npy")
            np.save(tmp, lat.numpy().astype(np.float16))
            tmp.replace(cache.path(e, v))
        accelerator.wait_for_everyone()
        return cache


def _latent_fingerprint(policy: VPPPolicy, dataset: ClipDataset) -> str:
    """Hash of what the cached latents depend on: VAE weights, frame size, episodes."""
    h = hashlib.sha256(f"{dataset.frames.size}".encode())
    for key, tensor in sorted(policy.tvp.vae.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    for ep in dataset.episodes:
        h.update(f"{ep.episode.name}|{ep.num_frames}\n".encode())
    return h.hexdigest()[:16]


class CachedClipDataset(Dataset):
    """Stage-1 items from the latent cache: ``latents`` [F, C, h, w] float32 + tokens."""

    def __init__(self, dataset: ClipDataset, cache: LatentCache):
        self.dataset, self.cache = dataset, cache

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.dataset.samples[i]
        ids, mask = self.dataset.tokens(self.dataset.instruction(i))
        lat = np.asarray(self.cache.get(s.episode, s.view)[list(s.frame_ids)], dtype=np.float32)
        return {"latents": torch.from_numpy(lat), "input_ids": ids, "attention_mask": mask, "index": torch.tensor(i)}


class _Batcher:
    """Turns a (local) batch into the denoiser's inputs, with the step's random draws."""

    def __init__(self, policy: VPPPolicy, cfg: TrainConfig, accelerator):
        self.policy, self.cfg, self.acc = policy, cfg, accelerator
        self.scale = policy.tvp.vae.config.scaling_factor
        t = policy.preset.tvp
        self.time_ids = (float(t.fps), float(t.motion_bucket_id))

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor], step: int, purpose: str = "train") -> dict[str, torch.Tensor]:
        cfg, acc, policy = self.cfg, self.acc, self.policy
        device = acc.device
        global_b = cfg.batch_size if purpose == "train" else batch["input_ids"].shape[0]
        part = (lambda x: local_slice(x, acc)) if purpose == "train" else (lambda x: x)
        gen = step_generator(cfg.seed, step, f"tvp-{purpose}")
        sigma = part((torch.randn(global_b, generator=gen) * cfg.tvp.p_std + cfg.tvp.p_mean).exp()).to(device)
        keep_text = part(torch.rand(global_b, generator=gen) >= cfg.tvp.text_dropout).to(device)
        aug_strength = part((torch.randn(global_b, generator=gen) * 0.5 - 3.0).exp()).to(device)
        condition, _ = policy.encode_text(batch["input_ids"], batch["attention_mask"])
        condition = condition * keep_text.view(-1, 1, 1).to(condition.dtype)
        if "latents" in batch:  # cached: the first latent conditions, without noise augmentation
            latents = batch["latents"]
            image_latent = latents[:, 0] / self.scale
            aug_strength = torch.zeros_like(aug_strength)
        else:
            frames = batch["frames"]
            latents = encode_latents(policy, frames) * self.scale
            image = frames_to_input(frames[:, 0])
            if cfg.tvp.noise_aug:
                pix_noise = part(torch.randn((global_b, *image.shape[1:]), generator=gen)).to(device)
                image = image + aug_strength.view(-1, 1, 1, 1) * pix_noise
            else:
                aug_strength = torch.zeros_like(aug_strength)
            image_latent = policy.tvp.encode_images(image.to(policy.tvp.vae.dtype))
        noise = part(torch.randn((global_b, *latents.shape[1:]), generator=gen)).to(device)
        time_ids = torch.stack([torch.full_like(aug_strength, self.time_ids[0]),
                                torch.full_like(aug_strength, self.time_ids[1]), aug_strength], dim=1)
        return {"latents": latents.float(), "image_latent": image_latent.float(), "condition": condition.float(),
                "added_time_ids": time_ids.float(), "noise": noise.float(), "sigma": sigma.float()}


@torch.no_grad()
def predict_clip(policy: VPPPolicy, first_frame: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor,
                 steps: int, seed: int) -> torch.Tensor:
    """Generate a clip from its first frame (uint8 [S, S, 3]) with the Euler sampler: uint8 [F, S, S, 3]."""
    tvp = policy.tvp
    device = next(tvp.unet.parameters()).device
    scheduler = EulerDiscreteScheduler.from_config(tvp.scheduler_config)
    scheduler.set_timesteps(steps, device="cpu")
    frames = tvp.num_frames
    image_latent = encode_latents(policy, first_frame[None].to(device))  # [1, C, h, w], unscaled
    condition, _ = policy.encode_text(input_ids[None].to(device), mask[None].to(device))
    gen = torch.Generator().manual_seed(seed)
    latents = (torch.randn((1, frames, *image_latent.shape[1:]), generator=gen) * scheduler.init_noise_sigma).to(device)
    time_ids = tvp.added_time_ids.to(device)
    cond = image_latent.unsqueeze(1).expand(-1, frames, -1, -1, -1)
    for t in scheduler.timesteps:
        sample = torch.cat([scheduler.scale_model_input(latents, t), cond], dim=2)
        pred = tvp.unet(sample, t.to(device), encoder_hidden_states=condition, added_time_ids=time_ids).sample
        latents = scheduler.step(pred, t, latents).prev_sample
    decoded = tvp.vae.decode(latents.flatten(0, 1) / tvp.vae.config.scaling_factor, num_frames=frames).sample
    return ((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def save_gif(path: Path, truth: list[np.ndarray], predicted: list[np.ndarray], fps: float = 4.0) -> Path:
    """Clips side by side; ground truth on top, prediction below. Arrays uint8 [F, S, S, 3]."""
    top = np.concatenate(truth, axis=2)
    bottom = np.concatenate(predicted, axis=2)
    frames = [Image.fromarray(np.concatenate([a, b], axis=0)) for a, b in zip(top, bottom)]
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
    return path


def save_video_model(policy: VPPPolicy, tokenizer, folder: Path) -> None:
    """diffusers SVD layout + ``clip/`` + the preset, readable by ``load_official``."""
    tvp = policy.tvp
    with _quiet_hf():
        tvp.unet.save_pretrained(folder / "unet")
        tvp.vae.save_pretrained(folder / "vae")
        EulerDiscreteScheduler.from_config(tvp.scheduler_config).save_pretrained(folder / "scheduler")
        policy.text_encoder.clip.save_pretrained(folder / "clip")
    tokenizer.save(folder / "clip")
    (folder / PRESET_FILE).write_text(json.dumps(policy.preset.to_dict(), indent=2, default=list), encoding="utf-8")


def train_tvp(cfg: TrainConfig, run: str | Path, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train stage 1 into the run folder ``run``; returns the summary (also ``summary.json``).

    ``resume`` continues from the run's last checkpoint (weights, optimizer, EMA, step).
    """
    with cpu_threads(cfg.threads):
        return _train_tvp(cfg, run, resume, progress)


def _train_tvp(cfg: TrainConfig, run: str | Path, resume: bool, progress: bool) -> dict[str, Any]:
    run = Path(run)
    accelerator, main, previous = open_run(cfg, run, resume)
    device = accelerator.device

    policy, tokenizer, init_source = initial_policy(cfg, cfg.resolve_preset())
    preset = policy.preset
    report = BadDataReport()
    # Actions are not used here: videos without them are fine, so no action-dim check.
    episodes = load_sources(list(cfg.data.sources), 1, None, cfg.data.bad_data, report, progress=progress and main)
    train_eps, val_eps = split_episodes(episodes, cfg.data.val_fraction)
    clip_args = dict(num_views=min(e.episode.frames.num_views for e in episodes), image_size=preset.image_size,
                     clip_len=preset.tvp.num_frames, tokenizer=tokenizer, stride=cfg.data.clip_stride,
                     start_stride=cfg.data.clip_start_stride, mode=cfg.data.clip_mode,
                     cache_episodes=cfg.data.cache_episodes)
    train_ds = ClipDataset(train_eps, **clip_args)
    val_ds = ClipDataset(val_eps or train_eps, **clip_args)

    policy.requires_grad_(False)
    policy.to(device).eval()
    unet = policy.tvp.unet
    names = cfg.tvp.trainable_modules
    for name, p in unet.named_parameters():
        p.requires_grad_("all" in names or any(n in name for n in names))
    trainable = [p for p in unet.parameters() if p.requires_grad]
    if not trainable:
        raise VPPError(f"tvp.trainable_modules {list(names)} match no UNet parameter")
    if cfg.tvp.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    denoiser = TVPDenoiser(unet)

    items: Any = train_ds
    if cfg.tvp.latent_cache:
        items = CachedClipDataset(train_ds, LatentCache.build(policy, train_ds, run / "cache", "train", accelerator,
                                                              progress))
    optimizer, ema = make_optimizer(cfg, trainable)
    start = resume_step(cfg, run, previous, resume, denoiser, optimizer, ema)
    weights = [cfg.data.sources[i].weight for i in sorted({e.source_index for e in train_ds.episodes})]
    _, loader = mixture_loader(cfg, items, train_ds.source_sizes, weights, start)
    denoiser_ddp, optimizer, loader = accelerator.prepare(denoiser, optimizer, loader)
    batcher = _Batcher(policy, cfg, accelerator)
    metrics = MetricsLog(run, enabled=main)
    preview = [i * len(val_ds) // cfg.tvp.sample_count for i in range(cfg.tvp.sample_count)] if len(val_ds) else []
    if main:
        log.info("stage 1: %d train clips (%d episodes), %d val clips; %d trainable UNet tensors; %d process(es); "
                 "init: %s", len(train_ds), len(train_eps), len(val_ds), len(trainable), accelerator.num_processes,
                 init_source)

    def with_ema(fn):
        with ema_applied(ema, trainable, unet):
            return fn()

    val_rows = sorted({i * len(val_ds) // min(8, len(val_ds)) for i in range(min(8, len(val_ds)))})

    @torch.no_grad()
    def validate() -> dict[str, float]:
        """The loss on up to 8 held-out clips with the same noise every time (comparable across steps)."""
        items_ = [val_ds[i] for i in val_rows]
        b = {k: torch.stack([it[k] for it in items_]).to(device) for k in ("frames", "input_ids", "attention_mask")}
        with accelerator.autocast():
            loss = denoiser(**batcher(b, 0, purpose="val"))
        return {"val/loss": float(loss)}

    def samples(step: int) -> Path:
        truth, pred = [], []
        for k, i in enumerate(preview):
            clip = torch.from_numpy(val_ds.clip(i))
            ids, mask = val_ds.tokens(val_ds.instruction(i))
            truth.append(clip.numpy())
            pred.append(predict_clip(policy, clip[0], ids, mask, cfg.tvp.sample_steps, seed=cfg.seed + k).numpy())
        return save_gif(run / "samples" / f"step-{step:07d}.gif", truth, pred, fps=float(preset.tvp.fps))

    def save(step: int) -> Path:
        meta = {"step": step, "stage": "tvp", "seed": cfg.seed, "config": cfg.to_dict(),
                "world_size": accelerator.num_processes}

        def write(folder: Path) -> None:
            with_ema(lambda: save_video_model(policy, tokenizer, folder))
            save_training_state(folder / STATE_DIR, denoiser.state_dict(), optimizer, ema, meta)

        return write_checkpoint(run, step, write, cfg.keep_checkpoints)

    bar = tqdm(total=cfg.steps, initial=start, desc="stage 1 (TVP)", disable=not (progress and main))
    losses = LossLog(metrics, bar, cfg)
    val_metrics: dict[str, float] = {}
    first_val: dict[str, float] = {}
    step = start
    if main and start == 0:  # the untrained reference
        val_metrics = with_ema(validate)
        metrics.log(0, val_metrics)
        first_val = val_metrics
    started = time.perf_counter()
    for batch_data in loader:
        lr = set_lr(optimizer, step, cfg.steps, cfg.optim)
        with accelerator.autocast():
            inputs = batcher(batch_data, step)
            loss = denoiser_ddp(**inputs)
        reduced = update(accelerator, loss, trainable, optimizer, ema, cfg.optim.grad_clip)
        step += 1
        losses.add(step, reduced, lr)
        if main and (step % cfg.val_every == 0 or step == cfg.steps):
            val_metrics = with_ema(validate)
            metrics.log(step, val_metrics)
        if main and preview and ((cfg.tvp.sample_every and step % cfg.tvp.sample_every == 0) or step == cfg.steps):
            gif = with_ema(lambda: samples(step))
            log.info("prediction preview: %s", gif)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            if main:
                save(step)
            accelerator.wait_for_everyone()
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - started
    summary = {"stage": "tvp", "steps": step, "start_step": start, "seconds": round(seconds, 2), **val_metrics,
               **{f"{k}@0": v for k, v in first_val.items()}, "train_clips": len(train_ds),
               "processes": accelerator.num_processes, "skipped_episodes": report.skipped,
               "checkpoint": str(latest_checkpoint(run)), "init": init_source}
    return finish_run(run, summary, losses, metrics, main, accelerator, "stage 1")
