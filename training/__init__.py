"""The VPP model and its training (stage 1: TVP, stage 2: policy)."""
