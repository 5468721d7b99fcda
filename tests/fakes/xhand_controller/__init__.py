"""Fake of RobotEra's xhand_controller SDK (only what the driver calls)."""
