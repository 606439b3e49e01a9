"""critbatch-waves: a model and a dataset that critbatch finds by entry point (see pyproject.toml)."""
