"""Deployment to a robot computer (Jetson): bundle, copy over SSH, check, build engines,
install systemd units, self-test, and roll back on failure (``vpp deploy``).

The modules that run on the target (``checksums``, ``checks``, ``remote``, ``supervisor``,
and ``wheels``, whose lock parsing the agent uses)
use the standard library only: they run before the robot's Python environment exists.
"""
