"""VPP policy: text -> TVP features -> Video Former -> diffusion action head.

This one module is the model for training, export (which wraps its stages) and the
PyTorch runtime backend. Every random input (TVP noise latents, action noise) is an
explicit argument, so a prediction is a pure function of its inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vpp_edge.normalization import ActionNormalizer, StateNormalizer
from vpp_edge.presets import Preset

from .action_head import EDMActionHead
from .text import TextEncoder
from .tvp import TVPFeatureExtractor
from .video_former import VideoFormer


@dataclass(frozen=True)
class PolicyNoise:
    """The two noise inputs of one prediction."""

    tvp: torch.Tensor  # [B, V, F, C_lat, h, w] unit normal
    action: torch.Tensor  # [B, T, A] unit normal


class VPPPolicy(nn.Module):
    """The Video Prediction Policy.

    Shapes for the CALVIN preset (B = batch, V = 2 views):
      frames [B, 2, 3, 256, 256] in [-1, 1]   -> VAE latents [B*2, 4, 32, 32]
      TVP features [B*2, 16, 2560, 16, 16]     -> tokens [B, 16, 2*256, 2560]
      Video Former [B, 224, 384]; goal [B, 512] -> action chunk [B, 10, 7]
    """

    def __init__(self, preset: Preset, text_encoder: TextEncoder, tvp: TVPFeatureExtractor,
                 normalizer: ActionNormalizer | None = None, state_normalizer: StateNormalizer | None = None):
        super().__init__()
        self.preset = preset
        self.text_encoder = text_encoder
        self.tvp = tvp
        self.former = VideoFormer(preset.former, tvp.feature_channels)
        self.action_head = EDMActionHead(
            preset.action_head,
            action_dim=preset.action_dim,
            horizon=preset.action_horizon,
            obs_dim=preset.former.dim,
            goal_dim=text_encoder.goal_dim,
            num_obs_tokens=self.former.num_tokens,
        )
        self.set_normalizer(normalizer or ActionNormalizer())
        self.set_state_normalizer(state_normalizer)

    def set_normalizer(self, normalizer: ActionNormalizer) -> None:
        """Install action statistics (checked against the action dimension)."""
        scale, offset = normalizer.scale_offset(self.preset.action_dim)
        self.normalizer = normalizer
        self.register_buffer("action_scale", torch.from_numpy(scale), persistent=False)
        self.register_buffer("action_offset", torch.from_numpy(offset), persistent=False)

    def set_state_normalizer(self, normalizer: StateNormalizer | None) -> None:
        """Install the robot-state statistics of a policy with ``action_head.use_proprio``.

        Without statistics such a policy gets ``[-1, 1]`` bounds (states pass through
        unchanged): right for an untrained model, never for trained weights, whose loaders
        require the statistics they were trained with.
        """
        head = self.preset.action_head
        if not head.use_proprio:
            if normalizer is not None:
                raise ValueError(f"preset '{self.preset.name}' takes no robot state (action_head.use_proprio is "
                                 "false): state statistics do not belong to it")
            self.state_normalizer = None
            return
        normalizer = normalizer or StateNormalizer(low=(-1.0,) * head.proprio_dim, high=(1.0,) * head.proprio_dim)
        if normalizer.dim != head.proprio_dim:
            raise ValueError(f"state statistics have {normalizer.dim} dims, the policy takes a state of "
                             f"{head.proprio_dim} (action_head.proprio_dim)")
        self.state_normalizer = normalizer

    def normalize_state(self, state) -> torch.Tensor | None:
        """Raw robot state [proprio_dim] (checked: shape, finite, range) -> model input [1, proprio_dim];
        None for a policy without state input (which refuses a state)."""
        if self.state_normalizer is None:
            if state is not None:
                raise ValueError(f"preset '{self.preset.name}' takes no robot state (action_head.use_proprio is false)")
            return None
        if state is None:
            raise ValueError(f"preset '{self.preset.name}' takes the robot state ({self.state_normalizer.dim} values)")
        return torch.from_numpy(self.state_normalizer.normalize(state))[None]

    # ---- shapes -----------------------------------------------------------------------
    def noise_shapes(self, batch: int = 1) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of the TVP noise latents and of the action noise for ``batch`` samples."""
        p = self.preset
        _, frames, ch, h, w = self.tvp.noise_shape(batch * p.num_views, p.image_size)
        return (batch, p.num_views, frames, ch, h, w), (batch, p.action_horizon, p.action_dim)

    def make_noise(self, batch: int = 1, seed: int = 0) -> PolicyNoise:
        """Seeded noise for ``batch`` predictions: same seed, same noise, on any machine."""
        gen = torch.Generator().manual_seed(seed)
        tvp_shape, action_shape = self.noise_shapes(batch)
        return PolicyNoise(tvp=torch.randn(tvp_shape, generator=gen), action=torch.randn(action_shape, generator=gen))

    # ---- stages -----------------------------------------------------------------------
    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [B, L] -> (TVP condition [B, L, 2H], goal [B, P])."""
        return self.text_encoder(input_ids, attention_mask)

    def predictive_features(self, frames: torch.Tensor, condition: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Frames [B, V, 3, H, W] -> Video Former input [B, F', V*h*w, C] (all views in one UNet batch)."""
        b, v = frames.shape[:2]
        if v != self.preset.num_views:
            raise ValueError(f"preset '{self.preset.name}' expects {self.preset.num_views} views, got {v}")
        feats = self.tvp(frames.flatten(0, 1), condition.repeat_interleave(v, dim=0), noise.flatten(0, 1))
        _, f, c, h, w = feats.shape
        kept = self.preset.former.num_frames
        feats = feats.view(b, v, f, c, h * w)[:, :, :kept]
        # Tokens of a frame: view 0's h*w positions, then view 1's, ... (as the official concat).
        return feats.permute(0, 2, 1, 4, 3).reshape(b, kept, v * h * w, c)

    def sample_actions(self, tokens: torch.Tensor, goal: torch.Tensor, action_noise: torch.Tensor,
                       state: torch.Tensor | None = None) -> torch.Tensor:
        """Former tokens + goal (+ normalised state with ``action_head.use_proprio``) ->
        normalised action chunk [B, T, A]."""
        return self.action_head.sample(tokens, goal, action_noise, state)

    def denormalize(self, actions: torch.Tensor) -> torch.Tensor:
        return actions * self.action_scale + self.action_offset

    def forward(self, frames: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                tvp_noise: torch.Tensor, action_noise: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
        """The whole predict step: de-normalised action chunk [B, T, A] (``state``: the
        normalised robot state [B, proprio_dim] of a policy with ``action_head.use_proprio``)."""
        condition, goal = self.encode_text(input_ids, attention_mask)
        tokens = self.former(self.predictive_features(frames, condition, tvp_noise))
        return self.denormalize(self.sample_actions(tokens, goal, action_noise, state))
