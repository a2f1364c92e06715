"""One error hierarchy; each error knows the exit code the CLI returns for it."""

from __future__ import annotations

EXIT_OK = 0
#: a batch ended with at least one failed command
EXIT_FAILED = 1
#: the user's input (a file, an option) is at fault; matches click's own usage errors
EXIT_USAGE = 2
#: the broker could not be reached or refused us
EXIT_BROKER = 3
#: interrupted by Ctrl-C / SIGTERM
EXIT_INTERRUPTED = 130


class TbssQueueError(Exception):
    """Raised for every failure a user can cause; the CLI prints it as one line."""

    exit_code = EXIT_USAGE


class CommandsFileError(TbssQueueError):
    """Raised when a commands file cannot be read or a line cannot be parsed."""

    def __init__(self, path: str, reason: str, line: int | None = None) -> None:
        self.path, self.reason, self.line = path, reason, line
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {reason}")


class ConfigError(TbssQueueError):
    """Raised when an option or TBSS_QUEUE_* variable has a bad value."""


class BrokerUnavailable(TbssQueueError):
    """Raised when the Redis broker cannot be reached or refuses our credentials."""

    exit_code = EXIT_BROKER


class BatchBusy(TbssQueueError):
    """Raised when a verb needs a batch to have ended (forget) and it has not."""


class BatchNotFound(TbssQueueError):
    """Raised when a batch id (or 'the latest batch') does not exist on the broker."""


class EmbeddedRedisError(TbssQueueError):
    """Raised when the private redis-server of `tbss-queue run` cannot be started."""

    exit_code = EXIT_BROKER


class LogNotFound(TbssQueueError):
    """Raised when a command has no output to show: it has not started yet."""

    exit_code = EXIT_FAILED
