"""Exception types raised by pp-plugin.

Every error message names the offending value and the fix, so callers can show
``str(error)`` to users unchanged.
"""


class PPPluginError(Exception):
    """Base class of the errors raised by pp-plugin."""


class RecipeError(PPPluginError, ValueError):
    """Invalid recipe: an unknown key, a wrong type or an out-of-range value."""


class UnsupportedModelError(PPPluginError, ValueError):
    """Model architecture or layout that the pruning runtime cannot handle."""


class AssetError(PPPluginError, RuntimeError):
    """Model weights or text that could not be fetched, converted or read."""


class CacheError(PPPluginError, RuntimeError):
    """Cache file that is unreadable, corrupt or written for other settings."""
