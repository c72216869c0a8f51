"""Command-line entry points (``mamba2-generate``)."""
