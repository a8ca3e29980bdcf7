"""User-facing errors.

Every problem a user can fix (bad data, bad option, missing weights) is raised as a `CarsmlError` whose message
names the file / field / value and what was expected. The CLI prints these without a traceback.
"""


class CarsmlError(Exception):
    """An error caused by user input or environment, with a message that says how to fix it."""


class DataError(CarsmlError):
    """The dataset on disk does not match what a reader expects (missing file, bad field, corrupt image...)."""


class ConfigError(CarsmlError):
    """An experiment option has an invalid value."""
