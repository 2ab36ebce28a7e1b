"""The pipeline: :func:`pcace.rank` as a short sequence of stage calls, the scoring loop, the
manifest, per-label groups.
"""
