"""ml_collections configs, one file per experiment of the paper (see README)."""
