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


def truncate_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``length`` of an instruction's tokens, ending with its end-of-text token.

    What the official transformers tokenizer gives with ``truncation=True, max_length=length``
    (BOS, the first ``length - 2`` words, EOS; shorter ones padded as they were): an
    instruction of ``n > length`` tokens gets its EOS (id at ``n - 1``) at ``length - 1``.
    Traceable (no data-dependent shapes), so it is part of the exported text graph.
    """
    if input_ids.shape[-1] == length:
        return input_ids, attention_mask
    count = attention_mask.sum(dim=-1, keepdim=True)
    eos = input_ids.gather(-1, (count - 1).clamp(min=0))
    last = torch.where(count > length, eos, input_ids[:, length - 1:length])
    return torch.cat([input_ids[:, :length - 1], last], dim=-1), attention_mask[:, :length]


class TextEncoder(nn.Module):
    """Token ids -> (TVP condition [B, L, 2H], goal embedding [B, P]), as the official code.

    Input: the instruction tokenized to ``goal_length`` (77, OpenAI CLIP's context) ids.

    * goal: CLIP's projected, pooled text embedding of all ``goal_length`` tokens: the
      action head's language goal (official ``clip_lang_encoder.LangClip``, a separate
      77-token pass of the same ViT-B/32 text tower).
    * condition: CLIP's last hidden state for the first ``max_length`` tokens (truncated
      by :func:`truncate_tokens`), plus an optional sin-cos position table, duplicated
      along channels to SVD's 1024-d cross-attention width (the official TVP does this in
      place of an image embedding).

    The runtime runs this only when the instruction changes, and caches both outputs.
    """

    def __init__(self, clip: CLIPTextModelWithProjection, position_encoding: bool, max_length: int,
                 goal_length: int = 77):
        super().__init__()
        if not 2 <= max_length <= goal_length:
            raise ValueError(f"need 2 <= max_length ({max_length}) <= goal_length ({goal_length})")
        self.clip = clip
        self.max_length = max_length
        self.goal_length = goal_length
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
        """``input_ids``/``attention_mask``: int64 [B, goal_length]."""
        if input_ids.shape[-1] != self.goal_length:
            raise ValueError(f"expected {self.goal_length} tokens, got {input_ids.shape[-1]}")
        out = self.clip(input_ids=input_ids, attention_mask=attention_mask)
        if self.max_length == self.goal_length:
            hidden = out.last_hidden_state
        else:
            ids, mask = truncate_tokens(input_ids, attention_mask, self.max_length)
            hidden = self.clip.text_model(input_ids=ids, attention_mask=mask).last_hidden_state
        hidden = hidden + self.positions.to(hidden.dtype)
        condition = torch.cat([hidden, hidden], dim=-1)
        return condition, out.text_embeds


def build_random_clip(cfg: TextConfig, vocab_size: int | None = None, eos_token_id: int | None = None,
                      seed: int = 0) -> CLIPTextModelWithProjection:
    """A randomly initialised CLIP text tower with the preset's widths (seeded, reproducible)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModelWithProjection(clip_text_config(cfg, vocab_size, eos_token_id))
    return model.eval()


__all__ = ["TextEncoder", "build_random_clip", "clip_text_config", "sincos_position_encoding", "truncate_tokens"]
