"""Training loops: stage 1 (TVP video model) and stage 2 (Video Former + action head)."""

from .config import TrainConfig, available_configs, load_config

__all__ = ["TrainConfig", "available_configs", "load_config", "train_policy", "train_tvp"]


def train_policy(*args, **kwargs):
    """See :func:`vpp_edge.training.train.stage2.train_policy`."""
    from .stage2 import train_policy as run

    return run(*args, **kwargs)


def train_tvp(*args, **kwargs):
    """See :func:`vpp_edge.training.train.stage1.train_tvp`."""
    from .stage1 import train_tvp as run

    return run(*args, **kwargs)
