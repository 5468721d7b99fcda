"""Preset fields read from an official action model's tensor shapes.

An official ``dp-*.pt`` carries no config, but most of what the Video Former and the
action head are made of shows in its tensor shapes (official names, ``Video_Former.*``
and ``model.inner_model.*``). :func:`official_shapes` reads them; :func:`check_official_preset`
compares them with a preset and fails with one line that names the first mismatching
field and the shipped preset(s) that fit; :func:`preset_for_official` picks the shipped
preset when none is given. What shapes cannot show (attention heads, the text and video
model settings) comes from the preset.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch

from vpp_edge.errors import CheckpointError
from vpp_edge.presets import Preset, available_presets, get_preset

from .models.tvp import feature_channels

_FORMER = "Video_Former."
_HEAD = "model.inner_model."

# field -> what it is, in the order they are checked (the first mismatch is reported)
FIELDS = {
    "action_dim": "action dimensions (action_emb)",
    "action_horizon": "actions per chunk, act_seq_len (pos_emb)",
    "former.num_frames": "Former frames, Former_num_time_embeds (latents)",
    "former.queries_per_frame": "queries per frame, num_latents / frames (latents)",
    "former.dim": "Former width, latent_dim (latents)",
    "former.depth": "Former depth, Former_depth (layers)",
    "former.inner_dim": "Former attention width, Former_heads x Former_dim_head (to_q)",
    "feature_channels": "TVP feature channels, 1280 x layers with use_all_layer (goal_emb)",
    "action_head.embed_dim": "action-head width (tok_emb)",
    "action_head.n_enc_layers": "action-head encoder blocks",
    "action_head.n_dec_layers": "action-head decoder blocks",
    "action_head.proprio_dim": "proprioception width, proprio_dim (proprio_emb)",
}


def _shape(state: Mapping[str, Any], key: str, source: str) -> tuple[int, ...]:
    value = state.get(key)
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"{source}: key '{key}' missing; is this an official VPP action model?")
    return tuple(value.shape)


def _count(state: Mapping[str, Any], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def official_shapes(state: Mapping[str, Any], source: str) -> dict[str, int]:
    """The :data:`FIELDS` of an official action-model state dict (official key names)."""
    frames, queries, dim = _shape(state, _FORMER + "latents", source)
    embed, obs_dim = _shape(state, _HEAD + "tok_emb.weight", source)
    positions = _shape(state, _HEAD + "pos_emb", source)[1]
    return {
        "action_dim": _shape(state, _HEAD + "action_emb.weight", source)[1],
        # pos_emb: goal token + Former tokens + actions
        "action_horizon": positions - 1 - frames * queries,
        "former.num_frames": frames,
        "former.queries_per_frame": queries,
        "former.dim": dim,
        "former.depth": _count(state, _FORMER + "layers."),
        "former.inner_dim": _shape(state, _FORMER + "layers.0.0.to_q.weight", source)[0],
        "feature_channels": _shape(state, _FORMER + "goal_emb.0.weight", source)[1],
        "action_head.embed_dim": embed,
        "action_head.n_enc_layers": _count(state, _HEAD + "encoder.blocks."),
        "action_head.n_dec_layers": _count(state, _HEAD + "decoder.blocks."),
        "action_head.proprio_dim": _shape(state, _HEAD + "proprio_emb.0.weight", source)[1],
    }


def preset_shapes(preset: Preset, unet_config: Mapping[str, Any] | None = None) -> dict[str, int]:
    """The same :data:`FIELDS` as a preset builds them (with ``unet_config``, the loaded UNet's)."""
    f, h = preset.former, preset.action_head
    unet = dict(unet_config) if unet_config is not None else preset.unet_config()
    return {
        "action_dim": preset.action_dim,
        "action_horizon": preset.action_horizon,
        "former.num_frames": f.num_frames,
        "former.queries_per_frame": f.queries_per_frame,
        "former.dim": f.dim,
        "former.depth": f.depth,
        "former.inner_dim": f.heads * f.dim_head,
        "feature_channels": feature_channels(unet, preset.tvp.extract_layer_idx, preset.tvp.use_all_layer),
        "action_head.embed_dim": h.embed_dim,
        "action_head.n_enc_layers": h.n_enc_layers,
        "action_head.n_dec_layers": h.n_dec_layers,
        "action_head.proprio_dim": h.proprio_dim,
    }


def _mismatch(want: Mapping[str, int], got: Mapping[str, int]) -> str | None:
    return next((k for k in FIELDS if want[k] != got[k]), None)


def fitting_presets(shapes: Mapping[str, int], unet_config: Mapping[str, Any] | None = None) -> list[str]:
    """Shipped presets whose shapes equal ``shapes``."""
    return [name for name in available_presets()
            if _mismatch(preset_shapes(get_preset(name), unet_config), shapes) is None]


def _advice(fits: list[str]) -> str:
    if fits:
        return "use --preset " + " or --preset ".join(fits)
    return "no shipped preset fits; write a preset file with the checkpoint's values (vpp presets <name> shows one)"


def check_official_preset(preset: Preset, shapes: Mapping[str, int], source: str,
                          unet_config: Mapping[str, Any] | None = None) -> None:
    """Raise one-line :class:`CheckpointError` at the first field where ``preset`` and the checkpoint differ."""
    field = _mismatch(preset_shapes(preset, unet_config), shapes)
    if field is None:
        return
    want = preset_shapes(preset, unet_config)[field]
    raise CheckpointError(f"{source}: {field} ({FIELDS[field]}) is {shapes[field]} in the checkpoint but {want} in "
                          f"preset '{preset.name}'; {_advice(fitting_presets(shapes, unet_config))}")


def preset_for_official(shapes: Mapping[str, int], source: str,
                        unet_config: Mapping[str, Any] | None = None) -> Preset:
    """The one shipped preset that fits ``shapes``; otherwise a one-line error naming the candidates."""
    fits = fitting_presets(shapes, unet_config)
    if len(fits) == 1:
        return get_preset(fits[0])
    if fits:
        raise CheckpointError(f"{source}: the checkpoint fits presets {', '.join(fits)} (same shapes, other cameras "
                              f"or text settings); choose one with --preset")
    def distance(name: str) -> int:
        theirs = preset_shapes(get_preset(name), unet_config)
        return sum(theirs[k] != shapes[k] for k in FIELDS)

    closest = min(available_presets(), key=distance)
    field = _mismatch(preset_shapes(get_preset(closest), unet_config), shapes)
    raise CheckpointError(f"{source}: no shipped preset fits the checkpoint (closest '{closest}' differs at {field}: "
                          f"{shapes[field]} in the checkpoint); write a preset file with the checkpoint's values")


__all__ = ["FIELDS", "official_shapes", "preset_shapes", "check_official_preset", "fitting_presets",
           "preset_for_official"]
