"""Build a :class:`VPPPolicy` from a preset: random weights, or real components."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, UNetSpatioTemporalConditionModel
from transformers import CLIPTextModelWithProjection

from vpp_edge.normalization import ActionNormalizer
from vpp_edge.presets import Preset
from vpp_edge.tokenizer import InstructionTokenizer, byte_level_tokenizer

from .policy import VPPPolicy
from .text import TextEncoder, build_random_clip
from .tvp import TVPFeatureExtractor


def assemble_policy(
    preset: Preset,
    clip: CLIPTextModelWithProjection,
    unet: UNetSpatioTemporalConditionModel,
    vae: AutoencoderKLTemporalDecoder,
    scheduler: EulerDiscreteScheduler,
    normalizer: ActionNormalizer | None = None,
) -> VPPPolicy:
    """Wrap loaded (or random) components into a policy; Former and action head are new."""
    text = TextEncoder(clip, preset.text.position_encoding, preset.text.max_length, preset.text.goal_length)
    tvp = TVPFeatureExtractor(unet, vae, scheduler, preset.tvp)
    return VPPPolicy(preset, text, tvp, normalizer)


def build_policy(preset: Preset, seed: int = 0, normalizer: ActionNormalizer | None = None,
                 tokenizer: InstructionTokenizer | None = None,
                 device: str | torch.device = "cpu") -> tuple[VPPPolicy, InstructionTokenizer]:
    """A randomly initialised policy (seeded) and its tokenizer.

    Without a tokenizer, a byte-level one is made and the CLIP vocabulary sized to it
    (what tiny models use). ``device="meta"`` gives paper-scale shapes without
    allocating (or initialising) a single weight.
    """
    tokenizer = tokenizer or byte_level_tokenizer(preset.text.goal_length, preset.text.max_length)
    # The scheduler does arithmetic on its sigmas at construction: keep it on the CPU.
    scheduler = EulerDiscreteScheduler.from_config(preset.scheduler_config())
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        clip = build_random_clip(preset.text, vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id, seed=seed)
        unet = UNetSpatioTemporalConditionModel(**preset.unet_config())
        vae = AutoencoderKLTemporalDecoder(**preset.vae_config())
        policy = assemble_policy(preset, clip, unet, vae, scheduler, normalizer)
    return policy.to(device).eval(), tokenizer
