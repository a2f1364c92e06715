"""The `tbss-queue` group, the options every verb shares, and the one place where errors
become one-line messages and exit codes (`main`)."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

import click
import redis
from rich.console import Console

from tbss_queue.config import Settings
from tbss_queue.errors import EXIT_BROKER, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, TbssQueueError
from tbss_queue.local import Interrupted, kept_broker

EPILOG = """\b
Examples:
  tbss-queue demo demo-study --subjects 6      # a synthetic study to try things on
  tbss-queue run demo-study/FA/.commands       # everything on this machine, no set-up
  tbss-queue worker --broker redis://head:6379/0     # on every machine that should work
  tbss-queue submit FA/.commands --wait        # on the machine that holds the study
  tbss-queue status --watch
"""

# piped output (| less, > file, grep) is never wrapped at 80 columns: a line stays a line
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 4096)
err = Console(stderr=True, soft_wrap=True)


_CONNECTION_FILES = (
    (
        "tls-ca",
        False,
        "CA certificate(s) that signed Redis's certificate, for rediss:// "
        "(default: the system's CAs)",
    ),
    ("tls-cert", False, "Client certificate, when Redis asks for one"),
    ("tls-key", False, "Private key of --tls-cert"),
    ("sign-key", False, "Sign messages with this private key (Celery's auth serializer)"),
    ("sign-cert", False, "Certificate of --sign-key"),
    (
        "sign-store",
        True,
        "Directory of trusted signers' certificates; unsigned or foreign messages are refused",
    ),
)
"""Connection options naming a file or directory: (flag, is a directory, help)."""
CONNECTION_OPTIONS = (
    "broker",
    "result_backend",
    "tls_insecure",
    "sentinel_master",
    "sentinel_password",
    *(flag.replace("-", "_") for flag, _, _ in _CONNECTION_FILES),
)
"""The parameters of broker_options, handed to Settings.resolve."""


def broker_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--broker / --result-backend, declared once, resolved into Settings for the command."""

    @click.option(
        "--broker",
        envvar="TBSS_QUEUE_BROKER",
        metavar="URL",
        help="Redis URL of the queue, or sentinel://HOST:26379[;sentinel://HOST2:26379] "
        "[env TBSS_QUEUE_BROKER; default redis://localhost:6379/0].",
    )
    @click.option(
        "--result-backend",
        envvar="TBSS_QUEUE_RESULT_BACKEND",
        metavar="URL",
        help="Celery result backend [default: the broker].",
    )
    @click.option(
        "--sentinel-master",
        metavar="NAME",
        help="With a sentinel:// broker: the master's name in Sentinel "
        "[env TBSS_QUEUE_SENTINEL_MASTER; default mymaster].",
    )
    @click.option(
        "--sentinel-password",
        metavar="PASSWORD",
        help="Password of the Sentinels themselves (the master's goes in the URL) "
        "[env TBSS_QUEUE_SENTINEL_PASSWORD, which keeps it out of `ps`].",
    )
    @click.option(
        "--tls-insecure",
        is_flag=True,
        default=None,
        help="Do not verify Redis's certificate (testing only) [env TBSS_QUEUE_TLS_INSECURE].",
    )
    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        given = _inherited({name: kwargs.pop(name) for name in CONNECTION_OPTIONS})
        settings = Settings.resolve(**given)
        if settings.tls_insecure:
            err.print(
                "warning: --tls-insecure: Redis's certificate is not verified", highlight=False
            )
        return f(*args, settings=settings, **kwargs)

    for flag, is_dir, text in reversed(_CONNECTION_FILES):
        env = "TBSS_QUEUE_" + flag.upper().replace("-", "_")
        wrapper = click.option(
            f"--{flag}",
            type=click.Path(file_okay=not is_dir, dir_okay=is_dir),
            help=f"{text} [env {env}].",
        )(wrapper)
    return wrapper


_GIVEN = "tbss_queue.connection"
"""Key in click's context meta (shared by a verb and its subcommand) of the options given."""


def _inherited(own: dict[str, Any]) -> dict[str, Any]:
    """A subcommand's connection options over its verb's: `nodes --broker URL resume X` and
    `nodes resume X --broker URL` mean the same; given on both, the subcommand's wins. What
    the environment set is the same for both, so it never overrides a command-line value."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return own
    merged = dict(ctx.meta.get(_GIVEN, {}))
    for name, value in own.items():
        typed = ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE
        if value is not None and (typed or merged.get(name) is None):
            merged[name] = value
    ctx.meta[_GIVEN] = merged
    return merged


def read_broker_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """broker_options of a verb that reads what a batch left: with no broker configured it
    opens the Redis data a `tbss-queue run` kept here (FA/.tbss-queue) for the call."""

    @functools.wraps(f)
    def opened(*args: Any, settings: Settings, **kwargs: Any) -> Any:
        who = click.get_current_context().command_path
        with kept_broker(settings, who=who) as (chosen, run_dir):
            if run_dir is not None:
                err.print(
                    f"no broker configured: reading the data `tbss-queue run` kept in {run_dir}",
                    highlight=False,
                )
            return f(*args, settings=chosen, **kwargs)

    return broker_options(opened)


def policy_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """What a worker node agrees to run (--allow, --allow-file, --allow-any, --root,
    --max-time-limit), declared once: `worker` and `slurm-script` (for its pilots' workers)."""
    options = (
        click.option(
            "--allow",
            multiple=True,
            metavar="NAME_OR_PATH",
            help="Also run this executable (default: FSL's registration tools). Repeatable.",
        ),
        click.option(
            "--allow-file",
            type=click.Path(dir_okay=False),
            help="A file of further --allow entries, one per line.",
        ),
        click.option(
            "--allow-any",
            is_flag=True,
            help="Run any command that reaches the queue (no executable check).",
        ),
        click.option(
            "--root",
            multiple=True,
            metavar="DIR",
            envvar="TBSS_QUEUE_STUDY_ROOT",
            help="Only run commands whose directory lies under DIR. Repeatable; recommended "
            "[env TBSS_QUEUE_STUDY_ROOT, space-separated].",
        ),
        click.option(
            "--max-time-limit",
            type=click.FloatRange(min=0, min_open=True),
            metavar="SECONDS",
            help="Cap every batch's own time limit on this node.",
        ),
    )
    for option in reversed(options):
        f = option(f)
    return f


cwd_option = click.option(
    "--cwd",
    type=click.Path(file_okay=False),
    help="Directory the commands run in [default: the file's directory, FA/].",
)
time_limit_option = click.option(
    "--time-limit",
    type=float,
    metavar="SECONDS",
    help="Kill a command (and its children) after this long [default 6 h].",
)
done_if_exists_option = click.option(
    "--done-if-exists",
    metavar="PATTERN",
    help="Skip a command when a non-empty file matches PATTERN (relative to its directory; "
    "{out} {in} {ref} {last} {0}..{N} come from the line), at submit and again right before "
    "it starts. fsl_reg lines need none: their .msf and warp are checked.",
)
wait_option = click.option(
    "--wait", is_flag=True, help="Show progress until the batch ends; exit 1 on failure."
)


def json_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(f)


@click.group(epilog=EPILOG)
@click.version_option(package_name="tbss-queue")
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks and debug logs.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """Run the registration commands of an FSL TBSS study (FA/.commands) on many machines.

    Commands go to one Redis queue; `tbss-queue worker` on every machine runs them.
    """
    ctx.obj = {"verbose": verbose}
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point: map every TbssQueueError to its one-line message and exit code."""
    verbose = bool({"-v", "--verbose"} & set(argv or sys.argv))  # tracebacks only then
    try:
        cli.main(args=argv, prog_name="tbss-queue", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt, Interrupted):
        err.print("interrupted; run the same command again to resume")
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code if exc.exit_code else EXIT_USAGE)
    except TbssQueueError as exc:
        if verbose:
            raise
        click.echo(f"tbss-queue: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except redis.RedisError as exc:  # the broker failed mid-command (it answered at first)
        if verbose:
            raise
        click.echo(f"tbss-queue: error: broker: {type(exc).__name__}: {exc}", err=True)
        sys.exit(EXIT_BROKER)
    except SystemExit:
        raise
    sys.exit(EXIT_OK)
