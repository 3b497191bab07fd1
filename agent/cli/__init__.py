"""The ``recsys-agent`` command line."""
