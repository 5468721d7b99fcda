"""Model presets: named, frozen descriptions of a VPP model and its robot-facing shapes.

Presets are data (``vpp_edge/presets/<name>.yaml``); this module only parses and checks
them. It imports no torch, so the robot side can read the same shapes as training.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from vpp_edge.errors import PresetError
from vpp_edge.normalization import ACTION_BASES

PRESET_DIR = Path(__file__).with_name("presets")
_COMPONENT_FILE = "svd_defaults.yaml"


@dataclass(frozen=True)
class TextConfig:
    """CLIP text tower. Architecture fields matter only when no CLIP folder is loaded."""

    max_length: int = 20  # tokens kept for the TVP condition (padded / truncated), official max_length
    goal_length: int = 77  # tokens of the action head's goal pass: OpenAI CLIP's context length
    position_encoding: bool = False  # add 1-D sin-cos positions to the hidden states
    hidden_size: int = 512
    projection_dim: int = 512
    num_layers: int = 12
    num_heads: int = 8
    intermediate_size: int = 2048
    vocab_size: int = 49408
    max_position_embeddings: int = 77


@dataclass(frozen=True)
class TVPConfig:
    """Text-guided video prediction model, run once as a feature extractor."""

    num_frames: int = 16  # frames the UNet predicts
    timesteps: int = 20  # N of scheduler.set_timesteps(N); the first timestep is used
    extract_layer_idx: int = 1  # stop after this up-block
    use_all_layer: bool = True  # concat earlier up-blocks, upsampled to the last one
    fps: int = 4
    motion_bucket_id: int = 127
    noise_aug_strength: float = 0.0
    unet: dict[str, Any] = field(default_factory=dict)
    vae: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FormerConfig:
    """Video Former: per-frame perceiver over all views, then temporal attention."""

    dim: int = 384
    depth: int = 6
    heads: int = 8
    dim_head: int = 64
    num_frames: int = 16  # frames of TVP features kept
    queries_per_frame: int = 14
    ff_mult: int = 4


@dataclass(frozen=True)
class ActionHeadConfig:
    """MDT-style diffusion transformer with EDM preconditioning and a DDIM sampler."""

    embed_dim: int = 384
    n_enc_layers: int = 4
    n_dec_layers: int = 4
    n_heads: int = 8
    proprio_dim: int = 8  # width of proprio_emb (official GCDenoiser default 8; loads strictly)
    # Official real-robot policies (VPP_policy_xbot.py with state_obs) append proprio_emb of the
    # bound-normalised robot state to the encoder input; CALVIN's does not.
    use_proprio: bool = False
    attn_pdrop: float = 0.3
    resid_pdrop: float = 0.1
    mlp_pdrop: float = 0.05
    sigma_data: float = 0.5
    sigma_min: float = 0.001
    sigma_max: float = 80.0
    num_steps: int = 10
    sampler: str = "ddim"


@dataclass(frozen=True)
class Preset:
    """Everything that fixes the shapes of a VPP model and its inputs and outputs."""

    name: str
    description: str
    views: tuple[str, ...]
    action_dim: int
    action_horizon: int
    image_size: int = 256
    text: TextConfig = field(default_factory=TextConfig)
    tvp: TVPConfig = field(default_factory=TVPConfig)
    former: FormerConfig = field(default_factory=FormerConfig)
    action_head: ActionHeadConfig = field(default_factory=ActionHeadConfig)
    # What the de-normalised actions are relative to (vpp_edge.normalization.ACTION_BASES):
    # "none", or "state" for a policy trained on actions minus the robot state (official XBot).
    action_base: str = "none"

    @property
    def num_views(self) -> int:
        return len(self.views)

    @property
    def num_queries(self) -> int:
        """Video Former tokens handed to the action head."""
        return self.former.num_frames * self.former.queries_per_frame

    def unet_config(self) -> dict[str, Any]:
        """diffusers UNetSpatioTemporalConditionModel kwargs (SVD defaults + preset overrides)."""
        return {**_component_defaults()["unet"], **self.tvp.unet}

    def vae_config(self) -> dict[str, Any]:
        """diffusers AutoencoderKLTemporalDecoder kwargs (SVD defaults + preset overrides)."""
        return {**_component_defaults()["vae"], **self.tvp.vae}

    def scheduler_config(self) -> dict[str, Any]:
        """EulerDiscreteScheduler config (SVD defaults + preset overrides)."""
        return {**_component_defaults()["scheduler"], **self.tvp.scheduler}

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, as written into checkpoints and export manifests."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "Preset":
        """A copy with top-level fields or sections (``former={"depth": 2}``) changed."""
        return preset_from_dict({**self.to_dict(), **_merge_sections(self.to_dict(), changes)})


def _merge_sections(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merged[key] = {**base[key], **value}
        else:
            merged[key] = value
    return merged


@cache
def _component_defaults() -> dict[str, dict[str, Any]]:
    with open(PRESET_DIR / _COMPONENT_FILE, encoding="utf-8") as f:
        return yaml.safe_load(f)


_SECTIONS = {"text": TextConfig, "tvp": TVPConfig, "former": FormerConfig, "action_head": ActionHeadConfig}


def _build_section(cls: type, name: str, data: Any, source: str) -> Any:
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise PresetError(f"{source}: section '{name}' must be a mapping, got {type(data).__name__}")
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise PresetError(f"{source}: unknown key(s) {unknown} in '{name}'; allowed: {sorted(allowed)}")
    return cls(**data)


def preset_from_dict(data: dict[str, Any], source: str = "preset") -> Preset:
    """Build and validate a :class:`Preset` from plain data (a parsed YAML or JSON file)."""
    if not isinstance(data, dict):
        raise PresetError(f"{source}: expected a mapping at top level, got {type(data).__name__}")
    allowed = {f.name for f in dataclasses.fields(Preset)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise PresetError(f"{source}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    missing = sorted({"name", "views", "action_dim", "action_horizon"} - set(data))
    if missing:
        raise PresetError(f"{source}: missing required key(s) {missing}")
    kwargs = dict(data)
    kwargs.setdefault("description", "")
    kwargs["views"] = tuple(kwargs["views"])
    for name, cls in _SECTIONS.items():
        kwargs[name] = _build_section(cls, name, data.get(name), source)
    preset = Preset(**kwargs)
    _validate(preset, source)
    return preset


def _validate(p: Preset, source: str) -> None:
    def fail(msg: str) -> None:
        raise PresetError(f"{source}: {msg}")

    if not p.views:
        fail("'views' must name at least one camera")
    if len(set(p.views)) != len(p.views):
        fail(f"camera names in 'views' must be unique, got {list(p.views)}")
    for key in ("action_dim", "action_horizon", "image_size"):
        if int(getattr(p, key)) <= 0:
            fail(f"'{key}' must be positive, got {getattr(p, key)}")
    if p.image_size % 8:
        fail(f"'image_size' must be a multiple of 8 (the VAE downsamples by 8), got {p.image_size}")
    if p.tvp.timesteps <= 0:
        fail(f"tvp.timesteps must be positive, got {p.tvp.timesteps}")
    unet = p.unet_config()
    n_up = len(unet["up_block_types"])
    if not 0 <= p.tvp.extract_layer_idx < n_up - 1:
        fail(f"tvp.extract_layer_idx must be in [0, {n_up - 2}] for a UNet with {n_up} up-blocks, "
             f"got {p.tvp.extract_layer_idx}")
    if p.former.num_frames > p.tvp.num_frames:
        fail(f"former.num_frames ({p.former.num_frames}) cannot exceed tvp.num_frames ({p.tvp.num_frames})")
    if unet["cross_attention_dim"] != 2 * p.text.hidden_size:
        fail(f"tvp.unet.cross_attention_dim ({unet['cross_attention_dim']}) must be twice "
             f"text.hidden_size ({p.text.hidden_size}): the CLIP states are duplicated for SVD")
    if not 2 <= p.text.max_length <= p.text.goal_length <= p.text.max_position_embeddings:
        fail(f"text lengths must satisfy 2 <= max_length ({p.text.max_length}) <= goal_length "
             f"({p.text.goal_length}) <= max_position_embeddings ({p.text.max_position_embeddings})")
    if p.text.hidden_size % 2:
        fail(f"text.hidden_size must be even for the sin-cos position encoding, got {p.text.hidden_size}")
    if p.action_head.embed_dim % p.action_head.n_heads:
        fail(f"action_head.embed_dim ({p.action_head.embed_dim}) must divide by n_heads ({p.action_head.n_heads})")
    if p.action_head.sampler != "ddim":
        fail(f"action_head.sampler '{p.action_head.sampler}' is not supported; allowed: ['ddim']")
    if not 0 < p.action_head.sigma_min < p.action_head.sigma_max:
        fail("action_head needs 0 < sigma_min < sigma_max")
    if p.action_base not in ACTION_BASES:
        fail(f"action_base '{p.action_base}' unknown; allowed: {sorted(ACTION_BASES)}")
    if p.action_base == "state" and not (p.action_head.use_proprio and p.action_head.proprio_dim >= p.action_dim):
        fail(f"action_base 'state' adds the robot state's first {p.action_dim} values to the actions: it needs "
             f"action_head.use_proprio and proprio_dim >= action_dim ({p.action_head.proprio_dim})")


def available_presets() -> list[str]:
    """Names of the presets shipped in ``vpp_edge/presets``."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if p.name != _COMPONENT_FILE)


def load_preset_file(path: str | Path) -> Preset:
    """Read a preset from a YAML (or JSON) file anywhere on disk."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise PresetError(f"preset file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise PresetError(f"{path}: not valid YAML ({exc})") from None
    return preset_from_dict(data, source=str(path))


def get_preset(name_or_path: str) -> Preset:
    """Look up a shipped preset by name, or read one from a file path.

    An unknown name raises :class:`PresetError` that lists the presets and suggests the
    closest match.
    """
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml", ".json") or candidate.is_file():
        return load_preset_file(candidate)
    names = available_presets()
    if name_or_path not in names:
        close = difflib.get_close_matches(name_or_path, names, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise PresetError(f"unknown preset '{name_or_path}'{hint} (available: {', '.join(names)})")
    return load_preset_file(PRESET_DIR / f"{name_or_path}.yaml")
