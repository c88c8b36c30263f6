"""The two errors the data pipeline raises on purpose. Both carry a message that names the file or field at fault.

ConfigError (a data config field has a bad value) is the project's one config error, from the config leaf.
"""
from configs import ConfigError  # noqa: F401  (re-exported: data_pipeline's modules raise it from here)


class DataError(RuntimeError):
    """Input data is missing, corrupt, or does not match its manifest (the message names the file)."""
