"""Typed errors. Each names the bad value and, where it helps, the allowed ones."""


class VPPError(Exception):
    """Base class for every error vpp-edge raises on purpose."""


class PresetError(VPPError, ValueError):
    """Unknown preset, or a preset file that does not describe a valid model."""


class CheckpointError(VPPError):
    """A checkpoint file or folder is missing, corrupt or does not match the preset."""


class DataError(VPPError):
    """An episode, video or annotation cannot be read or is inconsistent."""


class MissingDependencyError(VPPError, ImportError):
    """An optional component (TensorRT, DALI, a robot SDK, ...) is not installed."""


class ConfigError(VPPError, ValueError):
    """A configuration file or command-line value that cannot be used."""


class RunFailed(VPPError):
    """A run ended without doing its job (no frames, the bridge vanished, chunks refused)."""
