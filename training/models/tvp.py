"""TVP one-step feature extractor on diffusers' SVD UNet and temporal VAE.

VPP does not generate a video at run time. It runs the text-guided video prediction
model once, at the scheduler's first timestep, stops the UNet after up-block
``extract_layer_idx``, and uses the up-sampling features as the predictive visual
representation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, UNetSpatioTemporalConditionModel
from torch import nn

from vpp_edge.presets import TVPConfig

from .temporal_context import share_temporal_context


def up_block_channels(unet_config: dict) -> list[int]:
    """Output channels of each up-block (the reversed ``block_out_channels``)."""
    return list(reversed(list(unet_config["block_out_channels"])))


def feature_channels(unet_config: dict, extract_layer_idx: int, use_all_layer: bool) -> int:
    """Channels of the aggregated TVP feature (2560 for SVD, layer 1, all layers)."""
    chans = up_block_channels(unet_config)
    return sum(chans[: extract_layer_idx + 1]) if use_all_layer else chans[extract_layer_idx]


class TVPFeatureExtractor(nn.Module):
    """Frames + text condition + noise -> multi-layer UNet features, in ONE UNet forward.

    Inputs (``forward``):
      * ``frames``: float [N, 3, H, W] in [-1, 1]; N = batch x views, all views batched.
      * ``condition``: float [N, L, cross_attention_dim] (text condition, repeated per view).
      * ``noise``: float [N, F, C_lat, H/8, W/8] standard normal (explicit for reproducibility).

    Output: float [N, F, C_feat, h, w] with h = w = H/8 / 2**(n_down - 1 - extract_layer_idx).
    """

    def __init__(
        self,
        unet: UNetSpatioTemporalConditionModel,
        vae: AutoencoderKLTemporalDecoder,
        scheduler: EulerDiscreteScheduler,
        cfg: TVPConfig,
    ):
        super().__init__()
        n_up = len(unet.up_blocks)
        if not 0 <= cfg.extract_layer_idx < n_up - 1:
            raise ValueError(f"extract_layer_idx must be in [0, {n_up - 2}], got {cfg.extract_layer_idx}")
        if unet.config.in_channels != 2 * vae.config.latent_channels:
            raise ValueError(
                f"UNet in_channels ({unet.config.in_channels}) must be twice the VAE latent channels "
                f"({vae.config.latent_channels}): noise latents are concatenated with image latents"
            )
        self.unet = unet
        self.vae = vae
        share_temporal_context(unet)  # exact; its text keys/values once per video, not per position
        self.scheduler_config = dict(scheduler.config)
        self.num_frames = cfg.num_frames
        self.extract_layer_idx = cfg.extract_layer_idx
        self.use_all_layer = cfg.use_all_layer
        self.num_inference_steps = cfg.timesteps

        # Everything that depends only on the scheduler is fixed here, so the graph sees
        # constants: the first timestep, the initial noise scale, and the input scaling.
        scheduler.set_timesteps(cfg.timesteps, device="cpu")
        t0 = scheduler.timesteps[0]
        input_scale = float(scheduler.scale_model_input(torch.ones(1, device="cpu"), t0)[0])
        self.register_buffer("timestep", torch.tensor([float(t0)]), persistent=False)
        self.register_buffer("noise_scale", torch.tensor(float(scheduler.init_noise_sigma) * input_scale),
                             persistent=False)
        # SVD's added time ids, as the official extractor passes them (fps, motion bucket, noise aug).
        ids = torch.tensor([[cfg.fps, cfg.motion_bucket_id, cfg.noise_aug_strength]], dtype=torch.float32)
        self.register_buffer("added_time_ids", ids, persistent=False)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def feature_channels(self) -> int:
        return feature_channels(self.unet.config, self.extract_layer_idx, self.use_all_layer)

    def noise_shape(self, n: int, image_size: int) -> tuple[int, int, int, int, int]:
        """Shape of the ``noise`` input for ``n`` images of ``image_size`` pixels."""
        lat = image_size // 2 ** (len(self.vae.config.block_out_channels) - 1)
        return (n, self.num_frames, self.latent_channels, lat, lat)

    def encode_images(self, frames: torch.Tensor) -> torch.Tensor:
        """VAE posterior mode (mean), unscaled, as SVD conditions on it: [N, C_lat, h, w]."""
        moments = self.vae.quant_conv(self.vae.encoder(frames))
        return moments[:, : self.latent_channels]

    def forward(self, frames: torch.Tensor, condition: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        n = frames.shape[0]
        dtype = self.unet.dtype
        image_latents = self.encode_images(frames.to(self.vae.dtype)).to(dtype)
        image_latents = image_latents.unsqueeze(1).expand(-1, self.num_frames, -1, -1, -1)
        noisy = noise.to(dtype) * self.noise_scale.to(dtype)
        sample = torch.cat([noisy, image_latents], dim=2)
        feats = self.up_features(sample, condition.to(dtype), self.added_time_ids.expand(n, -1))
        return feats.reshape(n, self.num_frames, *feats.shape[1:])

    def up_features(self, sample: torch.Tensor, condition: torch.Tensor, added_time_ids: torch.Tensor) -> torch.Tensor:
        """The UNet forward of diffusers, stopped after up-block ``extract_layer_idx``.

        Returns [N * F, C_feat, h, w]; earlier up-block outputs are upsampled (nearest)
        to the last one's resolution and concatenated on channels when ``use_all_layer``.
        """
        unet = self.unet
        n, frames = sample.shape[:2]
        t_emb = unet.time_proj(self.timestep.expand(n)).to(sample.dtype)
        emb = unet.time_embedding(t_emb)
        time_embeds = unet.add_time_proj(added_time_ids.flatten()).reshape(n, -1).to(emb.dtype)
        emb = emb + unet.add_embedding(time_embeds)
        emb = emb.repeat_interleave(frames, dim=0)
        context = condition.repeat_interleave(frames, dim=0)
        indicator = torch.zeros(n, frames, dtype=sample.dtype, device=sample.device)

        x = unet.conv_in(sample.flatten(0, 1))
        skips: tuple[torch.Tensor, ...] = (x,)
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                x, res = block(hidden_states=x, temb=emb, encoder_hidden_states=context, image_only_indicator=indicator)
            else:
                x, res = block(hidden_states=x, temb=emb, image_only_indicator=indicator)
            skips += res
        x = unet.mid_block(hidden_states=x, temb=emb, encoder_hidden_states=context, image_only_indicator=indicator)

        outputs = []
        for block in unet.up_blocks[: self.extract_layer_idx + 1]:
            res, skips = skips[-len(block.resnets):], skips[: -len(block.resnets)]
            if getattr(block, "has_cross_attention", False):
                x = block(hidden_states=x, temb=emb, res_hidden_states_tuple=res,
                          encoder_hidden_states=context, image_only_indicator=indicator)
            else:
                x = block(hidden_states=x, temb=emb, res_hidden_states_tuple=res, image_only_indicator=indicator)
            outputs.append(x)
        if not self.use_all_layer:
            return x
        last = self.extract_layer_idx
        upsampled = [F.interpolate(o, scale_factor=2 ** (last - i)) for i, o in enumerate(outputs[:-1])]
        return torch.cat([*upsampled, x], dim=1)
