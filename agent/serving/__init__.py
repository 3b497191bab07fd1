"""HTTP serving and metrics."""
