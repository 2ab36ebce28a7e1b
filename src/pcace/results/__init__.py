"""A run's result (tables, manifest, components) and its directory on disk: atomic files, the
manifest, checkpoints.
"""
