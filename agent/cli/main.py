"""The ``recsys-agent`` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import shlex
import signal
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, AsyncExitStack, suppress
from pathlib import Path

from threadpoolctl import threadpool_limits

from agent.bus.embedded_server import NatsServerError, client_url
from agent.cli.settings_flags import add_settings_flags, configure_logging, settings_from_args
from agent.config import ConfigError, PortInUse, Settings, redact_url

log = logging.getLogger("agent")

# Sub-commands other modules add: name -> (configure parser, run); kept in one table so that
# ``recsys-agent --help`` lists everything.
Command = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


async def serve(settings: Settings) -> None:
    from agent.app import Agent

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with AsyncExitStack() as stack:
        # A signal during the start (a bus that is not there yet is retried without end)
        # abandons the start, which closes whatever it had opened.
        starting = asyncio.ensure_future(stack.enter_async_context(Agent(settings)))
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            # as often as it takes: nats-py's connect waits inside asyncio.wait_for, which
            # swallows a cancel that comes as its wait ends (a refused connection), and then
            # retries the connection as if nothing had been asked
            while not starting.done():
                starting.cancel()
                await asyncio.wait({starting}, timeout=0.1)
            with suppress(asyncio.CancelledError):
                await starting
            log.info("signal received while starting; stopped")
            return
        stopping.cancel()
        agent = starting.result()
        if settings.demo:
            from agent.demo import load_demo_catalog

            # before the banner: whoever opens the page finds the catalog there (embedding it
            # the first time takes a while: a signal meanwhile stops the agent)
            loading = asyncio.ensure_future(load_demo_catalog(agent))
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not loading.done():
                loading.cancel()
                with suppress(asyncio.CancelledError):
                    await loading
                log.info("signal received while loading the demo catalog; stopped")
                return
            loading.result()
        print(f"recsys-agent listening: NATS {redact_url(agent.nats_url)}  HTTP {agent.http_url}", flush=True)
        if settings.demo:
            print(f"demo: open {agent.http_url}/ in a browser (data dir {settings.data_dir})", flush=True)
        if agent.nats_credentials_file is not None:
            # where the secret is, never the secret: a banner ends up in logs
            print(
                f"NATS asks for a user and password, kept in {agent.nats_credentials_file}; a client's URL:"
                f" recsys-agent nats-credentials --data-dir {shlex.quote(str(settings.data_dir))}",
                flush=True,
            )
        await stop.wait()
        log.info("signal received, draining")


def _run(args: argparse.Namespace) -> int:
    defaults = None
    if args.demo and args.data_dir is None:
        from agent.demo import demo_data_dir

        # its own data dir: the demo's catalog and users never mix with a real deployment's
        defaults = {"data_dir": str(demo_data_dir())}
    settings = settings_from_args(args, defaults)
    configure_logging(settings.log_level)
    asyncio.run(serve(settings))
    return 0


def _nats_credentials(args: argparse.Namespace) -> int:
    """Print the URL, credentials included, of the embedded nats-server on the data dir.

    On stdout alone and never logged (``export NATS_URL=$(recsys-agent nats-credentials)``
    is what the nats CLI and most clients read): it holds the password.
    """
    settings = settings_from_args(args)
    if settings.nats_servers():
        print(
            f"recsys-agent nats-credentials: this agent uses the NATS server at {redact_url(settings.nats_url)}"
            " (nats_url): its credentials are that server's",
            file=sys.stderr,
        )
        return 1
    try:
        url = client_url(settings.data_dir, settings.nats_port)
    except NatsServerError as exc:
        print(f"recsys-agent nats-credentials: {exc}", file=sys.stderr)
        return 1
    print(url)
    return 0


def _token(args: argparse.Namespace) -> int:
    """Print a token for user ``USER_ID`` (websockets: ``/v1/ws?token=``) on stdout and nothing
    else, so that ``TOKEN=$(recsys-agent token alice)`` works; signed with the agent's secret
    (``RECSYS_TOKEN_SECRET``, else the data dir's, made on first use)."""
    from agent.serving.socket_tokens import TokenSigner, token_secret

    settings = settings_from_args(args)
    try:
        ttl = args.ttl if args.ttl is not None else settings.ws_ttl_s
        token, _ = TokenSigner(token_secret(settings)).mint(args.user_id, ttl)
    except ValueError as exc:
        print(f"recsys-agent token: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0


def build_parser(extra: dict[str, Command]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recsys-agent", description="Real-time, LLM-assisted recommendation agent")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the agent (embedded NATS unless --nats-url)")
    add_settings_flags(run)
    run.add_argument(
        "--demo",
        action="store_true",
        default=None,
        help="load the shipped demo catalog and let the live page (GET /) mint tokens for demo users;"
        " its own data dir unless --data-dir",
    )
    run.set_defaults(handler=_run)
    token = commands.add_parser(
        "token", help="print a user's token for the websocket (/v1/ws?token=) on stdout, nothing else"
    )
    token.add_argument("user_id", metavar="USER_ID")
    token.add_argument("--ttl", type=int, metavar="SECONDS", help="lifetime (default: setting ws_ttl_s, 3600)")
    token.add_argument("--config", type=Path, help="TOML settings file")
    token.add_argument("--data-dir", help="the agent's data dir, where its token secret is kept")
    token.set_defaults(handler=_token)
    credentials = commands.add_parser(
        "nats-credentials",
        help="print the URL, with user and password, to connect to the agent's embedded nats-server",
    )
    credentials.add_argument("--config", type=Path, help="TOML settings file")
    credentials.add_argument("--data-dir", help="the agent's data dir")
    credentials.set_defaults(handler=_nats_credentials)
    for name, (configure, handler) in extra.items():
        sub = commands.add_parser(name)
        configure(sub)
        sub.set_defaults(handler=handler)
    return parser


def extra_commands() -> dict[str, Command]:
    from agent.cli import catalog_import
    from agent.evaluation import datasets, replay_command

    return {
        "dataset": (datasets.configure_parser, datasets.run_command),
        "replay": (replay_command.configure_parser, replay_command.run_command),
        "catalog": (catalog_import.configure_parser, catalog_import.run_command),
    }


def limit_blas_threads() -> AbstractContextManager[object]:
    """Limit the BLAS library behind numpy to one thread, for the whole process.

    The hot path's matrix products are small (a query against a few hundred candidate rows):
    with several BLAS threads the hand-off costs more than the product, and the threads compete
    with the event loop for the cores. The setting is process-wide (a library's global), so it
    is made here, where every command's process starts (the agent, replay, catalog import),
    not by a plugin. Sentence-transformers encodes in torch, whose threads are its own
    (``torch.set_num_threads``): embedding is not limited by this.

    Returned as a context manager that restores the previous limits, for callers that run a
    command inside a longer-lived process (the tests).
    """
    # threadpoolctl limits only the libraries already loaded: numpy's BLAS must be among them
    import numpy  # noqa: F401

    return threadpool_limits(1, user_api="blas")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(extra_commands())
    args = parser.parse_args(argv)
    try:
        with limit_blas_threads():
            return int(args.handler(args))
    except ConfigError as exc:
        print(f"recsys-agent: configuration error: {redact_url(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except PortInUse as exc:
        # says all a newcomer needs: which port, and the flag that moves it
        print(f"recsys-agent {args.command}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        # What stops a command in operation (a NATS server without JetStream, a file where a
        # directory belongs) is said in one line; the traceback is there for whoever runs
        # with --log-level DEBUG. An exception's text may quote a URL with its password.
        log.debug("%s failed", args.command, exc_info=exc)
        print(f"recsys-agent {args.command}: {exc.__class__.__name__}: {redact_url(str(exc))}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
