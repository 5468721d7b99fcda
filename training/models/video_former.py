"""Video Former (3D): compresses TVP features of all views and frames into a few tokens.

Per frame, learnable queries cross-attend (perceiver style) to that frame's tokens of
all camera views; then each query attends across frames (temporal self-attention); then
a feed-forward layer. Submodule names follow the official ``Video_Former_3D`` so its
checkpoints load without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vpp_edge.presets import FormerConfig


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    """Pre-norm GELU MLP without biases."""
    inner = dim * mult
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(), nn.Linear(inner, dim, bias=False))


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class PerceiverAttention(nn.Module):
    """Queries (latents) attend to [frame tokens ; latents]."""

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        inner = dim_head * heads
        self.heads = heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x = self.norm_media(features)
        latents = self.norm_latents(latents)
        kv = torch.cat([x, latents], dim=1)
        q = _split_heads(self.to_q(latents), self.heads)
        k = _split_heads(self.to_k(kv), self.heads)
        v = _split_heads(self.to_v(kv), self.heads)
        return self.to_out(_merge_heads(F.scaled_dot_product_attention(q, k, v)))


class TemporalAttention(nn.Module):
    """Multi-head self-attention across frames (fused qkv with bias)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"Former dim {dim} must divide by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (_split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        # The official layer passes an all-ones *float* mask, which adds a constant to every
        # score and so leaves the softmax unchanged: no mask is the same attention.
        return self.proj(_merge_heads(F.scaled_dot_product_attention(q, k, v)))


class VideoFormer(nn.Module):
    """[B, F, T, C_feat] TVP tokens (T = views x h x w) -> [B, F * queries, dim]."""

    def __init__(self, cfg: FormerConfig, condition_dim: int):
        super().__init__()
        self.cfg = cfg
        self.condition_dim = condition_dim
        dim = cfg.dim
        # Named goal_emb in the official code: it embeds the TVP features, not a goal.
        self.goal_emb = nn.Sequential(nn.Linear(condition_dim, dim * 2), nn.GELU(), nn.Linear(dim * 2, dim))
        self.latents = nn.Parameter(torch.randn(cfg.num_frames, cfg.queries_per_frame, dim))
        self.time_pos_emb = nn.Parameter(torch.randn(cfg.num_frames, 1, dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([
                PerceiverAttention(dim, cfg.dim_head, cfg.heads),
                TemporalAttention(dim, cfg.heads),
                feed_forward(dim, cfg.ff_mult),
            ])
            for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(dim)

    @property
    def num_tokens(self) -> int:
        return self.cfg.num_frames * self.cfg.queries_per_frame

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, frames, _, c = features.shape
        if frames != self.cfg.num_frames or c != self.condition_dim:
            raise ValueError(f"Video Former expects [B, {self.cfg.num_frames}, T, {self.condition_dim}], "
                             f"got {list(features.shape)}")
        x_f = self.goal_emb(features) + self.time_pos_emb.unsqueeze(0)
        x_f = x_f.flatten(0, 1)  # (B F) T d
        q = self.cfg.queries_per_frame
        x = self.latents.unsqueeze(0).expand(b, -1, -1, -1).reshape(b * frames, q, -1)
        for perceiver, temporal, ff in self.layers:
            x = x + perceiver(x_f, x)
            # (B F) q d -> (B q) F d: each query attends over time
            x = x.view(b, frames, q, -1).transpose(1, 2).reshape(b * q, frames, -1)
            x = x + temporal(x)
            x = x.view(b, q, frames, -1).transpose(1, 2).reshape(b * frames, q, -1)
            x = x + ff(x)
        return self.norm(x.reshape(b, frames * q, -1))
