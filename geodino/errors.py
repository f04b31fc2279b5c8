"""Exception types whose messages a user can act on.

Every error that stems from user input (a path, a band name, a config value) is a
``GeodinoError``; the CLI prints its message and exits non-zero without a traceback.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class GeodinoError(Exception):
    """Base class for errors caused by input the user can fix."""

    exit_code = 2


class InputError(GeodinoError):
    """A scene, label file or band selection that cannot be used."""


class ConfigError(GeodinoError):
    """A pipeline config, window geometry or option that is invalid."""


class ModelError(GeodinoError):
    """A backbone or head that cannot be loaded or does not fit together."""


class OutputExistsError(GeodinoError):
    """The output exists and --overwrite was not given."""
