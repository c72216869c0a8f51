"""mamba2-jax (public API being assembled)."""
