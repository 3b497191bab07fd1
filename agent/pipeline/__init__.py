"""The recommendation pipeline, its value types, the catalog and per-user state."""
