"""Errors the host raises. Every user-facing problem is one of these, with one clear message."""


class TrainerPluginsError(Exception):
    """Base class for every error trainer-plugins raises on purpose."""


class ConfigError(TrainerPluginsError, ValueError):
    """Bad input found before any model is loaded: unknown key, bad value, missing file or package,
    incompatible combination. The message says what is wrong and, where possible, what would work."""


class PluginError(TrainerPluginsError):
    """A plugin failed (import or hook). The message names the plugin and the hook."""

    def __init__(self, plugin: str, message: str, hook: str | None = None):
        self.plugin = plugin
        self.hook = hook
        where = f"plugin '{plugin}'" + (f" (hook {hook})" if hook else "")
        super().__init__(f"{where}: {message}")


class PluginConfigError(PluginError, ConfigError):
    """A plugin's validate hook rejected the configuration."""
