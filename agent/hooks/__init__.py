"""The plugin system: hook specifications, the hook runner and the plugin manager."""
