"""Device profiles (TOML data files), shipped in the wheel as ``edge_tl.profiles``."""
