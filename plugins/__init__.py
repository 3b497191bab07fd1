"""Built-in stages, each an ordinary plugin registered by ``agent.hooks.manager``."""
