"""vpp-edge: the Video Prediction Policy, exported and run fast and safely on a robot."""

__version__ = "0.1.0"
