"""Export recipes (TOML data files), shipped in the wheel as ``edge_tl.recipes``."""
