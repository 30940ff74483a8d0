"""The network, its checkpoints and conversions."""
