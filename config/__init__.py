"""backstop's configuration: one settings object, the Celery config, and the beat schedule."""

from config.settings import Settings, SettingsError, get_settings

__all__ = ["Settings", "SettingsError", "get_settings"]
