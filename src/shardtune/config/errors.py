"""User-facing errors: one clear paragraph, printed without a traceback by the CLI."""


class ShardtuneError(Exception):
    """An error caused by user input (config, paths, data, checkpoints). The CLI prints the
    message alone and exits with status 2."""


class ConfigError(ShardtuneError):
    """A bad option name, value or combination."""
