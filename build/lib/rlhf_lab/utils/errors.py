"""User-facing errors: the CLI prints these as one clear message instead of a traceback."""


class UserError(Exception):
    """A problem with the user's input (config, data file, paths): the message names what and where."""


class ConfigError(UserError):
    """An invalid configuration value; the message names the key and what was expected."""


class DataError(UserError):
    """An invalid data file or row; the message names the file, the row and the field."""


class StorageError(UserError):
    """A file could not be written (a full disk, a quota, permissions); the message names the file and says
    what was kept intact."""
