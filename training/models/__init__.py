"""The VPP model, defined once for training, export and the PyTorch backend."""

from .action_head import EDMActionHead
from .factory import build_policy
from .policy import PolicyNoise, VPPPolicy
from .text import TextEncoder
from .tvp import TVPFeatureExtractor
from .video_former import VideoFormer

__all__ = ["EDMActionHead", "PolicyNoise", "TVPFeatureExtractor", "TextEncoder", "VPPPolicy", "VideoFormer",
           "build_policy"]
