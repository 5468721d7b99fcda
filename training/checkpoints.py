"""Load and save VPP checkpoints.

Formats read:
  * official VPP release: a diffusers SVD folder (``unet/``, ``vae/``, ``scheduler/``, as
    ``svd-robot`` / ``svd-robot-calvin``), a transformers CLIP folder
    (``clip-vit-base-patch32``, with ``tokenizer.json``), and an action-model torch file
    whose ``['model']`` state dict uses the official names (``Video_Former.*``,
    ``model.inner_model.*``), as ``dp-calvin``;
  * ours: a folder with ``vpp_config.json`` (preset, normalisation, component configs),
    ``model.safetensors`` (every weight) and ``tokenizer.json``.

Nothing here executes code from a file: torch files are read with ``weights_only=True``
and everything we write is safetensors or JSON. Every failure is a
:class:`~vpp_edge.errors.CheckpointError` naming the file and, where relevant, the key.
"""

from __future__ import annotations

import contextlib
import json
import logging
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, UNetSpatioTemporalConditionModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from vpp_edge import __version__
from vpp_edge.files import atomic_dir, read_json
from vpp_edge.errors import CheckpointError
from vpp_edge.normalization import ActionNormalizer, StateNormalizer
from vpp_edge.presets import Preset, preset_from_dict
from vpp_edge.tokenizer import InstructionTokenizer, load_tokenizer

from .models.factory import assemble_policy
from .models.policy import VPPPolicy
from .official_shapes import check_official_preset, official_shapes, preset_for_official

log = logging.getLogger(__name__)

CONFIG_FILE = "vpp_config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_NAME = "vpp-edge-checkpoint"
FORMAT_VERSION = 1

# official action-model prefix -> our module prefix
OFFICIAL_PREFIXES = {"Video_Former.": "former.", "model.inner_model.": "action_head.inner_model."}
# Parts of the official state dict that come from the video-model and CLIP folders instead.
OFFICIAL_IGNORED_PREFIXES = ("TVP_encoder.", "language_goal.")


@contextlib.contextmanager
def _quiet_hf() -> Iterator[None]:
    """Silence diffusers/transformers load reports and progress bars; our errors say what matters."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    old = (dlog.get_verbosity(), tlog.get_verbosity())
    dlog.set_verbosity_error(), tlog.set_verbosity_error()
    dlog.disable_progress_bar(), tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(old[0]), tlog.set_verbosity(old[1])
        dlog.enable_progress_bar(), tlog.enable_progress_bar()


def _require_dir(path: Path, what: str) -> None:
    if not path.exists():
        raise CheckpointError(f"{path}: {what} not found")
    if not path.is_dir():
        raise CheckpointError(f"{path}: {what} must be a folder")


# ---------------------------------------------------------------------------------------
# state-dict checks
# ---------------------------------------------------------------------------------------
def check_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str,
                     prefix: str = "", file_key: Callable[[str], str] = lambda k: k) -> None:
    """Fail with a clear message on missing, unexpected or mis-shaped keys.

    Only keys under ``prefix`` of ``model.state_dict()`` are expected; ``file_key`` maps
    our key names to the names used in the file, so messages quote what the user has.
    """
    expected = {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    missing = sorted(file_key(k) for k in set(expected) - set(state))
    unexpected = sorted(file_key(k) for k in set(state) - set(expected))
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{source}: missing key(s) {missing[:5]}{more}")
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise CheckpointError(f"{source}: unexpected key(s) {unexpected[:5]}{more}")
    for key, ref in expected.items():
        got = state[key]
        if not isinstance(got, torch.Tensor):
            raise CheckpointError(f"{source}: key '{file_key(key)}' is a {type(got).__name__}, not a tensor")
        if tuple(got.shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{source}: key '{file_key(key)}' has shape {list(got.shape)}, the preset expects "
                f"{list(ref.shape)} (checkpoint and preset do not match)"
            )
        if not torch.is_floating_point(got):
            raise CheckpointError(f"{source}: key '{file_key(key)}' has dtype {got.dtype}, expected floating point")


def _load_into(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str, prefix: str = "",
               file_key: Callable[[str], str] = lambda k: k) -> None:
    check_state_dict(model, state, source, prefix, file_key)
    # Copy each tensor into fresh, allocator-aligned storage: tensors read from a file can sit
    # at odd addresses, which makes CPU kernels take other code paths and breaks bitwise
    # reproducibility. assign=True then keeps memory flat for meta-device skeletons.
    # Weights stored in another float type (fp16 releases) take the model's dtype.
    ref = model.state_dict()
    aligned = {k: v.to(dtype=ref[k].dtype, copy=True) for k, v in state.items()}
    model.load_state_dict({**_materialized(model, prefix), **aligned}, strict=True, assign=True)


def _materialized(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """Current tensors of the keys *outside* ``prefix`` (so a partial load stays strict)."""
    if not prefix:
        return {}
    return {k: v for k, v in model.state_dict().items() if not k.startswith(prefix)}


# ---------------------------------------------------------------------------------------
# official formats
# ---------------------------------------------------------------------------------------
def load_video_model(folder: str | Path) -> tuple[UNetSpatioTemporalConditionModel, AutoencoderKLTemporalDecoder,
                                                  EulerDiscreteScheduler]:
    """UNet, VAE and scheduler from a diffusers SVD pipeline folder."""
    folder = Path(folder)
    _require_dir(folder, "video model folder")
    for sub in ("unet", "vae", "scheduler"):
        _require_dir(folder / sub, f"'{sub}' subfolder of the video model")
    parts: dict[str, Any] = {}
    for sub, cls in (("unet", UNetSpatioTemporalConditionModel), ("vae", AutoencoderKLTemporalDecoder)):
        try:
            with _quiet_hf():
                parts[sub] = cls.from_pretrained(folder / sub)
        except Exception as exc:  # diffusers raises many types; name the folder instead
            raise CheckpointError(f"{folder / sub}: cannot load {cls.__name__}: {exc}") from None
    try:
        scheduler = EulerDiscreteScheduler.from_pretrained(folder / "scheduler")
    except Exception as exc:
        raise CheckpointError(f"{folder / 'scheduler'}: cannot load the scheduler config: {exc}") from None
    return parts["unet"].eval(), parts["vae"].eval(), scheduler


def load_clip(folder: str | Path, max_length: int,
              condition_length: int | None = None) -> tuple[CLIPTextModelWithProjection, InstructionTokenizer]:
    """CLIP text tower (with projection) and tokenizer (``max_length`` ids, warning past
    ``condition_length``) from a transformers CLIP folder."""
    folder = Path(folder)
    _require_dir(folder, "CLIP folder")
    tokenizer = load_tokenizer(folder, max_length, condition_length)
    try:
        with _quiet_hf():
            clip = CLIPTextModelWithProjection.from_pretrained(folder)
    except Exception as exc:
        raise CheckpointError(f"{folder}: cannot load the CLIP text model: {exc}") from None
    return clip.eval(), tokenizer


def read_torch_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of an official action-model file (``['model']``), read safely."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: action model file not found")
    try:
        # Memory-mapped (torch.save's zip format): the official file also carries a frozen copy of
        # the 6 GB video model (TVP_encoder.*), which is ignored and so never read into memory;
        # the tensors that are used are copied out by _load_into. Legacy files are read whole.
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # UnpicklingError for code-carrying pickles, RuntimeError for corrupt zips
        raise CheckpointError(f"{path}: not a readable weights-only torch file ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise CheckpointError(f"{path}: expected a state dict (or a dict with a 'model' state dict)")
    return obj


def from_official_state_dict(state: Mapping[str, Any], source: str) -> dict[str, torch.Tensor]:
    """Rename official action-model keys to ours, dropping the video/CLIP copies."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key.startswith(OFFICIAL_IGNORED_PREFIXES):
            continue
        for theirs, ours in OFFICIAL_PREFIXES.items():
            if key.startswith(theirs):
                out[ours + key[len(theirs):]] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{source}: unexpected key(s) {sorted(unknown)[:5]} (expected prefixes "
                              f"{list(OFFICIAL_PREFIXES) + list(OFFICIAL_IGNORED_PREFIXES)})")
    return out


def official_key(key: str) -> str:
    """Our key name -> the official one (unchanged if it has no official counterpart)."""
    for theirs, ours in OFFICIAL_PREFIXES.items():
        if key.startswith(ours):
            return theirs + key[len(ours):]
    return key


def to_official_state_dict(policy: VPPPolicy) -> dict[str, torch.Tensor]:
    """The Video Former and action head under the official names (for interchange and tests)."""
    return {official_key(k): v for k, v in policy.state_dict().items() if k.startswith(("former.", "action_head."))}


def load_official(preset: Preset | None, video_model: str | Path, clip: str | Path, action_model: str | Path | None,
                  normalizer: ActionNormalizer | None = None,
                  state_normalizer: StateNormalizer | None = None) -> tuple[VPPPolicy, InstructionTokenizer]:
    """Policy from the official release files; without ``action_model`` the Former and head stay random.

    A preset with ``action_head.use_proprio`` (the official XBot policy) needs
    ``state_normalizer``: the config's ``dataset_args.state_01`` / ``state_99`` that its
    states were normalised with in training; weights without them are refused.

    The action model's tensor shapes are checked against ``preset`` field by field
    (:mod:`.official_shapes`); without a preset, the one shipped preset they fit is used.
    """
    unet, vae, scheduler = load_video_model(video_model)
    official = read_torch_weights(action_model) if action_model is not None else None
    if official is not None:
        shapes = official_shapes(official, str(action_model))
        if preset is None:
            preset = preset_for_official(shapes, str(action_model), unet.config)
            log.info("%s: shapes fit preset '%s'", action_model, preset.name)
        else:
            check_official_preset(preset, shapes, str(action_model), unet.config)
    elif preset is None:
        raise CheckpointError(f"{video_model}: without an action model the preset cannot be read from the weights; "
                              f"name one with --preset")
    text_model, tokenizer = load_clip(clip, preset.text.goal_length, preset.text.max_length)
    _check_components(preset, unet, vae, text_model, f"{video_model} + {clip}")
    if preset.action_head.use_proprio and official is not None and state_normalizer is None:
        raise CheckpointError(f"{action_model}: preset '{preset.name}' feeds the robot state to the policy; give its "
                              "state bounds (the official config's dataset_args.state_01 / state_99) as "
                              "'state': {\"low\": [...], \"high\": [...]} in --normalization")
    policy = assemble_policy(preset, text_model, unet, vae, scheduler, normalizer)
    try:
        policy.set_state_normalizer(state_normalizer)
    except ValueError as exc:
        raise CheckpointError(f"{action_model or video_model}: {exc}") from None
    if official is not None:
        state = from_official_state_dict(official, str(action_model))
        for prefix in ("former.", "action_head."):
            part = {k: v for k, v in state.items() if k.startswith(prefix)}
            _load_into(policy, part, str(action_model), prefix, official_key)
    return policy.eval(), tokenizer


def _check_components(preset: Preset, unet: UNetSpatioTemporalConditionModel, vae: AutoencoderKLTemporalDecoder,
                      clip: CLIPTextModelWithProjection, source: str) -> None:
    """Loaded components must fit the preset's wiring (the Former width depends on them)."""
    want_cross = 2 * clip.config.hidden_size
    if unet.config.cross_attention_dim != want_cross:
        raise CheckpointError(f"{source}: UNet cross_attention_dim {unet.config.cross_attention_dim} does not fit "
                              f"CLIP hidden size {clip.config.hidden_size} (needs {want_cross})")
    n_up = len(unet.config.up_block_types)
    if preset.tvp.extract_layer_idx >= n_up - 1:
        raise CheckpointError(f"{source}: preset extract_layer_idx {preset.tvp.extract_layer_idx} does not fit a "
                              f"UNet with {n_up} up-blocks")
    if clip.config.max_position_embeddings < preset.text.goal_length:
        raise CheckpointError(f"{source}: CLIP has {clip.config.max_position_embeddings} positions, "
                              f"preset text.goal_length is {preset.text.goal_length}")


# ---------------------------------------------------------------------------------------
# our format
# ---------------------------------------------------------------------------------------
def save_checkpoint(policy: VPPPolicy, tokenizer: InstructionTokenizer, folder: str | Path,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write ``folder`` atomically: config JSON + safetensors weights + tokenizer.

    The files are written to a temporary sibling and renamed into place, so an
    interrupted save never leaves a half-written checkpoint.
    """
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        config = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "vpp_edge_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "preset": policy.preset.to_dict(),
            "normalization": policy.normalizer.to_dict(),
            **({"state_normalization": policy.state_normalizer.to_dict()} if policy.state_normalizer else {}),
            "components": {
                "clip": policy.text_encoder.clip.config.to_dict(),
                "unet": dict(policy.tvp.unet.config),
                "vae": dict(policy.tvp.vae.config),
                "scheduler": policy.tvp.scheduler_config,
            },
            **(extra or {}),
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=_json_default), encoding="utf-8")
        state = {k: v.detach().contiguous().cpu() for k, v in policy.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT_NAME})
        tokenizer.save(tmp)
    return folder


def compact_checkpoint(source: str | Path, folder: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write a copy of our checkpoint ``source`` to ``folder`` with its floating-point weights
    stored as ``dtype`` (FP16: half the size, to ship a trained model in the repository),
    without a training run's resume state. Loading casts the weights back to the model's
    dtype, so the copy is used like the original."""
    import shutil

    source = Path(source)
    read_checkpoint_config(source)
    state = load_file(str(source / WEIGHTS_FILE))
    with atomic_dir(folder) as tmp:
        for item in source.iterdir():  # the checkpoint's files; a training run's state folder stays behind
            if item.is_file() and item.name != WEIGHTS_FILE:
                shutil.copy2(item, tmp / item.name)
        save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, str(tmp / WEIGHTS_FILE),
                  metadata={"format": FORMAT_NAME, "stored_dtype": str(dtype).removeprefix("torch.")})
    return Path(folder)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (tuple, set)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def read_checkpoint_config(folder: str | Path) -> dict[str, Any]:
    """The parsed ``vpp_config.json`` of one of our checkpoints."""
    folder = Path(folder)
    _require_dir(folder, "checkpoint folder")
    path = folder / CONFIG_FILE
    config = read_json(path, CheckpointError, f"is {folder} a vpp-edge checkpoint?")
    if config.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: 'format' is {config.get('format')!r}, expected '{FORMAT_NAME}'")
    if config.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {config.get('format_version')} is not supported "
                              f"(this vpp-edge reads {FORMAT_VERSION})")
    for key in ("preset", "components"):
        if key not in config:
            raise CheckpointError(f"{path}: missing '{key}'")
    return config


def load_checkpoint(folder: str | Path, preset: Preset | None = None) -> tuple[VPPPolicy, InstructionTokenizer]:
    """Load one of our checkpoints. ``preset``, if given, must match the stored one."""
    folder = Path(folder)
    config = read_checkpoint_config(folder)
    stored = preset_from_dict(config["preset"], source=str(folder / CONFIG_FILE))
    if preset is not None and preset.to_dict() != stored.to_dict():
        diff = _first_difference(stored.to_dict(), preset.to_dict())
        raise CheckpointError(f"{folder}: checkpoint was made with preset '{stored.name}', which differs from the "
                              f"requested '{preset.name}' at {diff}")
    normalizer = ActionNormalizer.from_dict(config.get("normalization"))
    comps = config["components"]
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights}: weights file missing")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights}: corrupt or unreadable safetensors file ({exc})") from None
    tokenizer = load_tokenizer(folder, stored.text.goal_length, stored.text.max_length)
    try:
        with _quiet_hf(), init_empty_weights():
            clip = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(comps["clip"]))
            unet = UNetSpatioTemporalConditionModel.from_config(comps["unet"])
            vae = AutoencoderKLTemporalDecoder.from_config(comps["vae"])
        scheduler = EulerDiscreteScheduler.from_config(comps["scheduler"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{folder / CONFIG_FILE}: invalid component config ({exc})") from None
    _check_components(stored, unet, vae, clip, str(folder))
    with init_empty_weights():
        policy = assemble_policy(stored, clip, unet, vae, scheduler, normalizer)
    _load_into(policy, state, str(weights))
    try:
        policy.set_state_normalizer(StateNormalizer.from_dict(config.get("state_normalization")))
    except ValueError as exc:
        raise CheckpointError(f"{folder / CONFIG_FILE}: {exc}") from None
    return policy.eval(), tokenizer


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else key)
    return f"'{path}' ({a!r} vs {b!r})"
