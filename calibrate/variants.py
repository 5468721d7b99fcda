"""A trained policy run under another model configuration (fewer frames, fewer views, an
earlier TVP layer, other scheduler or sampler steps), with the trained weights.

Nothing is retrained: the variant shares the text encoder, UNet and VAE modules with
the trained policy, and its Video Former and action head get the trained tensors, cut
where a knob reduces a dimension:

* fewer frames: the Former's per-frame queries and time embeddings of the first frames;
* an earlier extract layer: with ``use_all_layer`` the feature channels of layers
  0..k-1 are a prefix of those of layers 0..k, so the Former's input projection keeps
  the matching input columns;
* fewer views: nothing to cut (the Former attends over however many tokens come).

The sweep measures what such a cut costs in accuracy; it does not claim it is free.
"""

from __future__ import annotations

import torch
from diffusers import EulerDiscreteScheduler

from vpp_edge.errors import VPPError
from vpp_edge.presets import Preset
from vpp_edge.training.models.factory import assemble_policy
from vpp_edge.training.models.policy import PolicyNoise, VPPPolicy


def _fit(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], frames: int, horizon: int,
         what: str) -> dict[str, torch.Tensor]:
    """Trained tensors shaped for the variant module (``target`` gives the shapes)."""
    out = {}
    for key, ref in target.items():
        src = source[key]
        if src.shape == ref.shape:
            out[key] = src
        elif key in ("latents", "time_pos_emb"):  # [F, ...] per-frame Former parameters
            out[key] = src[: ref.shape[0]]
        elif key == "goal_emb.0.weight":  # Former input projection [2D, C]: prefix channels
            out[key] = src[:, : ref.shape[1]]
        elif key == "inner_model.pos_emb":  # [1, 1 + tokens + horizon, D] (unused by the forward pass)
            tokens = ref.shape[1] - 1 - horizon
            out[key] = torch.cat([src[:, : 1 + tokens], src[:, src.shape[1] - horizon:]], dim=1)
        else:
            raise VPPError(f"{what}: trained tensor '{key}' {list(src.shape)} does not fit the variant's "
                           f"{list(ref.shape)}")
        if out[key].shape != ref.shape:
            raise VPPError(f"{what}: cannot cut '{key}' {list(src.shape)} to {list(ref.shape)}")
    return out


def derive_policy(base: VPPPolicy, preset: Preset) -> VPPPolicy:
    """``base``'s weights under ``preset`` (which must only reduce what ``base`` has)."""
    if preset.to_dict() == base.preset.to_dict():
        return base
    scheduler = EulerDiscreteScheduler.from_config(base.tvp.scheduler_config)
    clip = base.text_encoder.clip
    with torch.random.fork_rng(devices=[]):  # the new Former/head are overwritten below
        variant = assemble_policy(preset, clip, base.tvp.unet, base.tvp.vae, scheduler, base.normalizer)
    variant.set_state_normalizer(base.state_normalizer)  # a state-taking policy keeps its state bounds
    for name in ("former", "action_head"):
        module = getattr(variant, name)
        fitted = _fit(getattr(base, name).state_dict(), module.state_dict(), preset.former.num_frames,
                      preset.action_horizon, f"{name} of '{preset.name}'")
        module.load_state_dict(fitted, strict=True)
    return variant.eval()


def variant_noise(base_noise: PolicyNoise, preset: Preset) -> tuple[torch.Tensor, torch.Tensor]:
    """The base model's noise cut to the variant (first views, first frames), so every
    configuration sees the same random numbers where it has them."""
    tvp = base_noise.tvp[:, : preset.num_views, : preset.tvp.num_frames].contiguous()
    return tvp, base_noise.action
