"""User-facing errors: one clear paragraph, printed without a traceback by the CLI."""


class ShardtuneError(Exception):
    """An error caused by user input (config, paths, data, checkpoints). The CLI prints the
    message alone and exits with status 2."""


class ConfigError(ShardtuneError):
    """A bad option name, value or combination."""


class SameOnEveryRank(ShardtuneError):
    """An error that every rank of a job raises alike after agreeing on it in a collective (a save
    that found the disk full): rank 0 prints it, the other ranks exit with the same status quietly
    instead of racing the launcher to print it again."""
