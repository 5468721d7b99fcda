"""Closed-loop evaluation in simulators (MetaWorld) through the whole stack."""
