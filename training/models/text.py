"""Instruction encoder: the CLIP text tower shared by the TVP and the action head."""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from vpp_edge.presets import TextConfig


def sincos_position_encoding(length: int, dim: int) -> torch.Tensor:
    """1-D sin-cos table [length, dim]: sines in the first half, cosines in the second.

    Computed in float64, as the official TVP does, then handed back in float32.
    """
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = torch.arange(length, dtype=torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def clip_text_config(cfg: TextConfig, vocab_size: int | None = None, eos_token_id: int | None = None) -> CLIPTextConfig:
    """A ``CLIPTextConfig`` with the preset's widths (used to build random or tiny models)."""
    vocab = vocab_size or cfg.vocab_size
    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        projection_dim=cfg.projection_dim,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        # CLIP pools at the first end-of-text token; pad with it too.
        eos_token_id=vocab - 1 if eos_token_id is None else eos_token_id,
        pad_token_id=vocab - 1 if eos_token_id is None else eos_token_id,
        bos_token_id=vocab - 2,
    )


class TextEncoder(nn.Module):
    """Token ids -> (TVP condition [B, L, 2H], goal embedding [B, P]).

    * condition: CLIP's last hidden state for ``max_length`` tokens, plus an optional
      sin-cos position table, duplicated along channels to SVD's 1024-d cross-attention
      width (the official TVP does this in place of an image embedding).
    * goal: CLIP's projected, pooled text embedding: the action head's language goal.

    The runtime runs this only when the instruction changes, and caches both outputs.
    """

    def __init__(self, clip: CLIPTextModelWithProjection, position_encoding: bool, max_length: int):
        super().__init__()
        self.clip = clip
        self.max_length = max_length
        self.position_encoding = position_encoding
        hidden = clip.config.hidden_size
        table = sincos_position_encoding(max_length, hidden) if position_encoding else torch.zeros(max_length, hidden)
        # Not a parameter and not saved: it is a pure function of the config.
        self.register_buffer("positions", table, persistent=False)

    @property
    def hidden_size(self) -> int:
        return self.clip.config.hidden_size

    @property
    def goal_dim(self) -> int:
        return self.clip.config.projection_dim

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids``/``attention_mask``: int64 [B, max_length]."""
        if input_ids.shape[-1] != self.max_length:
            raise ValueError(f"expected {self.max_length} tokens, got {input_ids.shape[-1]}")
        out = self.clip(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state + self.positions.to(out.last_hidden_state.dtype)
        condition = torch.cat([hidden, hidden], dim=-1)
        return condition, out.text_embeds


def build_random_clip(cfg: TextConfig, vocab_size: int | None = None, eos_token_id: int | None = None,
                      seed: int = 0) -> CLIPTextModelWithProjection:
    """A randomly initialised CLIP text tower with the preset's widths (seeded, reproducible)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModelWithProjection(clip_text_config(cfg, vocab_size, eos_token_id))
    return model.eval()


def check_text_length(max_length: int, clip: CLIPTextModelWithProjection) -> None:
    """The TVP condition length must fit CLIP's position table."""
    limit = clip.config.max_position_embeddings
    if max_length > limit:
        raise ValueError(f"text.max_length {max_length} exceeds CLIP's {limit} positions")


__all__ = ["TextEncoder", "build_random_clip", "clip_text_config", "sincos_position_encoding", "check_text_length"]
