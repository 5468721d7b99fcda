"""Action head: the MDT-style diffusion transformer used by VPP, with EDM preconditioning.

An encoder reads [goal token ; Video Former tokens]; a decoder with AdaLN (FiLM) noise
conditioning denoises the action chunk, attending to the encoder output. Submodule names
follow the official ``DiffusionTransformer`` so ``model.inner_model.*`` checkpoints load.

Two details of the official model are kept on purpose because trained weights depend on
them: decoder attention is causal in *both* self- and cross-attention (the cross mask is
the top-left aligned lower triangle of [actions x context]), and the encoder context
does not depend on the noise level, so we compute it once per chunk instead of once per
sampling step (same numbers, ~10x less encoder work).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vpp_edge.presets import ActionHeadConfig

from .edm import ddim_step, exponential_sigmas, preconditioning


class BiasFreeLayerNorm(nn.Module):
    """LayerNorm with a weight and no bias (as the official blocks use)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, None, 1e-5)


class Attention(nn.Module):
    """Multi-head (self or cross) attention with separate q/k/v projections."""

    def __init__(self, dim: int, heads: int, attn_pdrop: float, resid_pdrop: float, causal: bool):
        super().__init__()
        self.heads = heads
        self.causal = causal
        self.key = nn.Linear(dim, dim)
        self.query = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.c_proj = nn.Linear(dim, dim, bias=False)
        self.attn_pdrop = attn_pdrop
        self.resid_dropout = nn.Dropout(resid_pdrop)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        kv = x if context is None else context
        q = self.query(x).view(b, n, self.heads, -1).transpose(1, 2)
        k = self.key(kv).view(b, kv.shape[1], self.heads, -1).transpose(1, 2)
        v = self.value(kv).view(b, kv.shape[1], self.heads, -1).transpose(1, 2)
        mask = None
        if self.causal:
            # Top-left aligned lower triangle, as SDPA's is_causal builds it, also when the
            # key length differs (cross-attention): query i sees keys 0..i.
            mask = torch.ones(n, kv.shape[1], dtype=torch.bool, device=x.device).tril()
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.attn_pdrop if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(b, n, c)))


class MLP(nn.Module):
    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.c_fc = nn.Linear(dim, 4 * dim, bias=False)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * dim, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, cfg: ActionHeadConfig):
        super().__init__()
        self.ln_1 = BiasFreeLayerNorm(dim)
        self.attn = Attention(dim, heads, cfg.attn_pdrop, cfg.resid_pdrop, causal=False)
        self.ln_2 = BiasFreeLayerNorm(dim)
        self.mlp = MLP(dim, cfg.mlp_pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class AdaLN(nn.Module):
    """Six modulation vectors (shift/scale/gate for attention and MLP) from the noise embedding."""

    def __init__(self, dim: int):
        super().__init__()
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim, bias=True))

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.modulation(c).chunk(6, dim=-1)


class DecoderBlock(nn.Module):
    """Causal self-attention (AdaLN-modulated), causal cross-attention, modulated MLP."""

    def __init__(self, dim: int, heads: int, cfg: ActionHeadConfig):
        super().__init__()
        self.ln_1 = BiasFreeLayerNorm(dim)
        self.attn = Attention(dim, heads, cfg.attn_pdrop, cfg.resid_pdrop, causal=True)
        self.cross_att = Attention(dim, heads, cfg.attn_pdrop, cfg.resid_pdrop, causal=True)
        self.ln3 = nn.LayerNorm(dim)
        self.ln_2 = BiasFreeLayerNorm(dim)
        self.mlp = MLP(dim, cfg.mlp_pdrop)
        self.adaLN_zero = AdaLN(dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_zero(c)
        # The official modulation is shift + x * scale (not x * (1 + scale)).
        x = x + gate_msa * self.attn(shift_msa + self.ln_1(x) * scale_msa)
        x = x + self.cross_att(self.ln3(x), context)
        return x + gate_mlp * self.mlp(shift_mlp + self.ln_2(x) * scale_mlp)


class Stack(nn.Module):
    """Blocks then a final bias-free LayerNorm (``blocks.*`` and ``ln`` in checkpoints)."""

    def __init__(self, blocks: list[nn.Module], dim: int):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.ln = BiasFreeLayerNorm(dim)


class SinusoidalEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=x.device) * -(math.log(10000) / (half - 1)))
        angles = x[..., None] * freqs  # FP32 (freqs promote a low-precision x): exact angles
        return torch.cat([angles.sin(), angles.cos()], dim=-1).to(x.dtype)


def _mlp_embed(in_dim: int, dim: int, act: type[nn.Module] = nn.GELU) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, dim * 2), act(), nn.Linear(dim * 2, dim))


class ActionTransformer(nn.Module):
    """The denoiser network D(actions, sigma | Former tokens, goal) before preconditioning."""

    def __init__(self, cfg: ActionHeadConfig, action_dim: int, horizon: int, obs_dim: int, goal_dim: int,
                 num_obs_tokens: int):
        super().__init__()
        d = cfg.embed_dim
        self.cfg = cfg
        self.action_dim = action_dim
        self.tok_emb = nn.Linear(obs_dim, d)
        self.lang_emb = _mlp_embed(goal_dim, d)
        # goal_emb and pos_emb are unused by VPP's forward pass, proprio_emb is used only with
        # cfg.use_proprio; they exist so that official checkpoints load strictly.
        self.goal_emb = _mlp_embed(goal_dim, d)
        self.proprio_emb = nn.Sequential(nn.Linear(cfg.proprio_dim, d * 2), nn.Mish(), nn.Linear(d * 2, d))
        self.pos_emb = nn.Parameter(torch.zeros(1, 1 + num_obs_tokens + horizon, d))
        self.encoder = Stack([EncoderBlock(d, cfg.n_heads, cfg) for _ in range(cfg.n_enc_layers)], d)
        self.decoder = Stack([DecoderBlock(d, cfg.n_heads, cfg) for _ in range(cfg.n_dec_layers)], d)
        self.sigma_emb = nn.Sequential(SinusoidalEmbedding(d), nn.Linear(d, d * 2), nn.Mish(), nn.Linear(d * 2, d))
        self.action_emb = nn.Linear(action_dim, d)
        self.action_pred = nn.Linear(d, action_dim)
        self.apply(self._init_weights)
        nn.init.normal_(self.pos_emb, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def encode(self, tokens: torch.Tensor, goal: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
        """[B, Q, obs_dim] Former tokens + [B, goal_dim] goal -> context [B, 1 + Q, D].

        With ``cfg.use_proprio``, ``state`` [B, proprio_dim] (normalised robot state) adds a
        last token, ``proprio_emb(state)``, as the official ``concatenate_inputs``: [B, 2 + Q, D].
        """
        parts = [self.lang_emb(goal.unsqueeze(1)), self.tok_emb(tokens)]
        if self.cfg.use_proprio:
            if state is None or state.shape[-1] != self.cfg.proprio_dim:
                got = "none" if state is None else list(state.shape)
                raise ValueError(f"this policy uses proprioception: pass the normalised state [B, "
                                 f"{self.cfg.proprio_dim}], got {got}")
            parts.append(self.proprio_emb(state.unsqueeze(1)))
        elif state is not None:
            raise ValueError("this policy does not use proprioception (action_head.use_proprio is false)")
        x = torch.cat(parts, dim=1)
        for block in self.encoder.blocks:
            x = block(x)
        return self.encoder.ln(x)

    def decode(self, context: torch.Tensor, actions: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Network output for scaled noisy actions [B, T, A] at noise level ``sigma`` [B]."""
        c = self.sigma_emb((sigma.log() / 4).reshape(-1, 1))  # [B, 1, D]
        x = self.action_emb(actions)
        for block in self.decoder.blocks:
            x = block(x, c, context)
        return self.action_pred(self.decoder.ln(x))


class EDMActionHead(nn.Module):
    """EDM-preconditioned denoiser plus the fixed-step DDIM sampler.

    The ``inner_model`` attribute name matches the official ``GCDenoiser``.
    """

    def __init__(self, cfg: ActionHeadConfig, action_dim: int, horizon: int, obs_dim: int, goal_dim: int,
                 num_obs_tokens: int):
        super().__init__()
        self.cfg = cfg
        self.action_dim = action_dim
        self.horizon = horizon
        self.inner_model = ActionTransformer(cfg, action_dim, horizon, obs_dim, goal_dim, num_obs_tokens)
        # Python floats: the sampler loop never reads a device tensor back (no host sync).
        self.sigmas: list[float] = exponential_sigmas(cfg.num_steps, cfg.sigma_min, cfg.sigma_max).tolist()

    def denoise(self, context: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Preconditioned denoiser D(x; sigma): the estimate of the clean normalised actions."""
        c_skip, c_out, c_in = (s.reshape(-1, 1, 1) for s in preconditioning(sigma, self.cfg.sigma_data))
        return self.inner_model.decode(context, x * c_in, sigma) * c_out + x * c_skip

    def step(self, context: torch.Tensor, x: torch.Tensor, i: int) -> torch.Tensor:
        """Sampler step ``i`` (0-based) of the fixed schedule: x at sigmas[i] -> sigmas[i + 1]."""
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        denoised = self.denoise(context, x, x.new_full((x.shape[0],), sigma))
        return ddim_step(x, denoised, sigma, sigma_next)

    def sample(self, tokens: torch.Tensor, goal: torch.Tensor, noise: torch.Tensor,
               state: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised action chunk [B, T, A] from unit Gaussian ``noise`` [B, T, A] (``state``:
        see :meth:`ActionTransformer.encode`)."""
        if noise.shape[1:] != (self.horizon, self.action_dim):
            raise ValueError(f"action noise must be [B, {self.horizon}, {self.action_dim}], got {list(noise.shape)}")
        context = self.inner_model.encode(tokens, goal, state)
        x = noise * self.cfg.sigma_max
        for i in range(self.cfg.num_steps):
            x = self.step(context, x, i)
        return x

    def loss(self, tokens: torch.Tensor, goal: torch.Tensor, actions: torch.Tensor, noise: torch.Tensor,
             sigma: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
        """EDM denoising loss for clean normalised ``actions`` at noise levels ``sigma`` [B]."""
        c_skip, c_out, c_in = (s.reshape(-1, 1, 1) for s in preconditioning(sigma, self.cfg.sigma_data))
        noised = actions + noise * sigma.reshape(-1, 1, 1)
        context = self.inner_model.encode(tokens, goal, state)
        out = self.inner_model.decode(context, noised * c_in, sigma)
        target = (actions - c_skip * noised) / c_out
        return (out - target).pow(2).flatten(1).mean()
