"""The one error type users see: a clear line, exit code 2 (130 for a stop request), no traceback (cli.py)."""


class EdgesslError(Exception):
    """Bad input or a state edgessl refuses to work from (path, spec, config, checkpoint)."""


class ConfigError(EdgesslError):
    """A config key that does not exist, or a value of the wrong type or range."""


class Stopped(EdgesslError):
    """SIGINT / SIGTERM stopped work that was saved to continue from (the CLI exits 130)."""
