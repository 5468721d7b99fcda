"""Training configuration: YAML presets in ``training/configs`` (data, not code), parsed
into frozen dataclasses with strict keys, plus ``key.sub=value`` command-line overrides.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vpp_edge.errors import ConfigError  # the one ConfigError (issue 21), still importable from here
from vpp_edge.presets import Preset, get_preset

from ..data.sources import SourceConfig, source_from_dict

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
STAGES = ("policy", "tvp")
MIXED_PRECISION = ("no", "fp16", "bf16")


@dataclass(frozen=True)
class DataConfig:
    """Where samples come from and how they are cut."""

    sources: tuple[SourceConfig, ...] = ()
    val_fraction: float = 0.1  # episodes held out per source for validation
    bad_data: str = "skip"  # skip | fatal
    normalization: str = "bounds"  # bounds (quantiles -> [-1, 1]) | mean_std | identity
    quantile: float = 0.01  # bounds: the 1st / 99th percentiles, as the official configs
    sample_stride: int = 1  # policy: every n-th time step is a sample
    action_stride: int = 1  # policy: steps between the actions of a chunk (official xhand: 2)
    clip_mode: str = "stride"  # tvp: stride | linspace
    clip_stride: int = 2  # tvp: frames between clip frames
    clip_start_stride: int = 2  # tvp: frames between clip starts
    cache_episodes: int = 8  # decoded episodes kept in memory


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up then cosine decay (the official tri-stage scheduler's shape)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.9)
    weight_decay: float = 0.05
    eps: float = 1e-8
    warmup_steps: int = 0
    warmup_start_scale: float = 0.1  # lr starts at lr * this during warm-up
    min_lr_scale: float = 0.01  # lr ends at lr * this
    grad_clip: float = 1.0  # max global gradient norm; 0 disables


@dataclass(frozen=True)
class EMAConfig:
    """Exponential moving average of the trained weights (diffusers' EMAModel)."""

    enabled: bool = True
    decay: float = 0.999  # upper bound of the decay
    warmup: bool = True  # decay = 1 - (1 + step) ** -power, capped at ``decay``
    power: float = 2 / 3


@dataclass(frozen=True)
class PolicyOptions:
    """Stage 2 only."""

    feature_cache: bool = True  # TVP features computed once and kept on disk (the TVP is frozen)
    feature_dtype: str = "float16"  # float16 | float32 on disk
    cache_batch: int = 8  # samples per TVP forward while filling the cache
    val_samples: int = 32  # validation observations (evenly spread over the held-out episodes)
    loss_seed: int | None = None  # noise seed; default: the run's seed


@dataclass(frozen=True)
class TVPOptions:
    """Stage 1 only (the official objective: EDM with log-normal sigmas, v-prediction scalings)."""

    p_mean: float = 0.7  # log-sigma mean of the training noise levels (official value)
    p_std: float = 1.6
    text_dropout: float = 0.05  # condition dropped to zeros (classifier-free guidance training)
    noise_aug: bool = True  # noise on the conditioning frame, strength exp(N(-3, 0.5))
    gradient_checkpointing: bool = False
    latent_cache: bool = False  # VAE latents of every frame computed once and kept on disk
    trainable_modules: tuple[str, ...] = ("all",)  # UNet parameter-name substrings, or "all"
    sample_every: int = 0  # steps between prediction GIFs (0: only at the end)
    sample_count: int = 2  # validation clips per GIF
    sample_steps: int = 10  # Euler steps of the preview sampler


@dataclass(frozen=True)
class TrainConfig:
    """One training run. ``init`` picks the starting weights:

    * ``{}``: random weights of the preset (seeded);
    * ``{checkpoint: DIR}``: a vpp-edge checkpoint (its preset);
    * ``{video_model: DIR, clip: DIR, action_model: FILE?}``: the official release files;
    * ``{tvp: DIR}``: a stage-1 output folder (``DIR`` and ``DIR/clip``).
    """

    stage: str
    preset: str = "tiny"
    preset_overrides: dict[str, Any] = field(default_factory=dict)
    init: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    steps: int = 1000
    batch_size: int = 8  # global batch (split across processes)
    log_every: int = 10
    val_every: int = 100
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    mixed_precision: str = "no"
    num_workers: int = 0
    threads: int = 0  # torch CPU threads per process (0: torch's choice)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    policy: PolicyOptions = field(default_factory=PolicyOptions)
    tvp: TVPOptions = field(default_factory=TVPOptions)

    def resolve_preset(self) -> Preset:
        preset = get_preset(self.preset)
        return preset.replace(**self.preset_overrides) if self.preset_overrides else preset

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if tp is SourceConfig:
        return source_from_dict(value)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(args[0], value, where)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp in (int, str, bool) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    if origin is dict and not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return value


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        hints = [difflib.get_close_matches(u, list(fields), n=1) for u in unknown]
        hint = "".join(f"; '{u}': did you mean '{h[0]}'?" for u, h in zip(unknown, hints) if h)
        raise ConfigError(f"{where}: unknown key(s) {unknown}{hint} (allowed: {sorted(fields)})")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _set_dotted(data: dict[str, Any], dotted: str) -> None:
    if "=" not in dotted:
        raise ConfigError(f"override '{dotted}' must look like key.sub=value")
    key, raw = dotted.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    node = data
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a section")
    node[parts[-1]] = value


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def config_path(name_or_path: str | Path) -> Path:
    """A shipped config by name (``policy_tiny``) or a YAML file path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"training config not found: {path}")
        return path
    names = available_configs()
    if str(name_or_path) not in names:
        close = difflib.get_close_matches(str(name_or_path), names, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown training config '{name_or_path}'{hint} (available: {', '.join(names)})")
    return CONFIG_DIR / f"{name_or_path}.yaml"


def config_from_dict(data: dict[str, Any], source: str = "config") -> TrainConfig:
    cfg = _build(TrainConfig, data, source)
    _validate(cfg, source)
    return cfg


def load_config(name_or_path: str | Path, overrides: list[str] | None = None, stage: str | None = None) -> TrainConfig:
    """Read a training config and apply ``key.sub=value`` overrides (values parsed as YAML)."""
    path = config_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    for item in overrides or []:
        _set_dotted(data, item)
    if stage is not None:
        if data.get("stage", stage) != stage:
            raise ConfigError(f"{path}: a stage '{data.get('stage')}' config, but training stage '{stage}' was asked")
        data["stage"] = stage
    return config_from_dict(data, str(path))


def _validate(cfg: TrainConfig, source: str) -> None:
    def fail(msg: str) -> None:
        raise ConfigError(f"{source}: {msg}")

    if cfg.stage not in STAGES:
        fail(f"stage '{cfg.stage}' unknown; allowed: {list(STAGES)}")
    if not cfg.data.sources:
        fail("data.sources must list at least one dataset")
    for key in ("steps", "batch_size", "log_every", "val_every", "checkpoint_every"):
        if getattr(cfg, key) <= 0:
            fail(f"'{key}' must be positive, got {getattr(cfg, key)}")
    if cfg.mixed_precision not in MIXED_PRECISION:
        fail(f"mixed_precision '{cfg.mixed_precision}' unknown; allowed: {list(MIXED_PRECISION)}")
    if cfg.policy.feature_dtype not in ("float16", "float32"):
        fail(f"policy.feature_dtype must be float16 or float32, got '{cfg.policy.feature_dtype}'")
    if not 0 <= cfg.data.val_fraction < 1:
        fail(f"data.val_fraction must be in [0, 1), got {cfg.data.val_fraction}")
    unknown_init = set(cfg.init) - {"checkpoint", "video_model", "clip", "action_model", "tvp"}
    if unknown_init:
        fail(f"init: unknown key(s) {sorted(unknown_init)}; allowed: checkpoint | video_model + clip "
             "(+ action_model) | tvp")


def save_config(cfg: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(_plain(cfg.to_dict()), sort_keys=False), encoding="utf-8")


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
