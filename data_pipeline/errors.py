"""The two errors the data pipeline raises on purpose. Both carry a message that names the file or field at fault."""


class ConfigError(ValueError):
    """A data config field has a bad value (the message names the field and the config file)."""


class DataError(RuntimeError):
    """Input data is missing, corrupt, or does not match its manifest (the message names the file)."""
