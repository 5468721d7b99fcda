"""Fake of UFACTORY's xarm-python-sdk (only what the driver calls)."""
