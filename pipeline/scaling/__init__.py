"""Scaling laws: fit loss against model size, data and compute (`pipeline scaling`)."""
