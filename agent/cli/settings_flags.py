"""Settings from the command line, shared by the ``recsys-agent`` sub-commands."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.config import Settings, load_settings

# Every flag that names a setting, as its argparse destination; a command lacking one reads None.
SETTINGS_FLAGS = (
    "data_dir",
    "nats_url",
    "nats_port",
    "qdrant_url",
    "embedding_model",
    "http_host",
    "http_port",
    "insecure",
    "subject_prefix",
    "log_level",
    "demo",
)


def add_pipeline_flags(
    parser: argparse.ArgumentParser,
    *,
    data_dir_help: str = "where JetStream and Qdrant keep their files",
    log_level: str | None = None,
) -> None:
    """The flags of every command that runs the plugin pipeline, in-process replay included.

    ``log_level``: the command's own default, which wins over the settings file and environment.
    """
    parser.add_argument("--config", type=Path, help="TOML settings file")
    parser.add_argument("--data-dir", help=data_dir_help)
    parser.add_argument(
        "--qdrant-url", help="use this Qdrant server or cluster instead of the local store in the data dir"
    )
    parser.add_argument("--embedding-model", help="sentence-transformers model (default: the bundled all-MiniLM-L6-v2)")
    default = f" (default {log_level})" if log_level else ""
    parser.add_argument("--log-level", default=log_level, help=f"DEBUG, INFO, WARNING or ERROR{default}")


def add_service_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of commands that talk to NATS or serve HTTP."""
    parser.add_argument("--nats-url", help="use this NATS server or cluster instead of spawning one")
    parser.add_argument("--nats-port", help="port of the spawned nats-server (0: any free port)")
    parser.add_argument("--http-host", help="address of the HTTP API")
    parser.add_argument("--http-port", help="port of the HTTP API (0: any free port)")
    # No --api-keys flag: a command line is visible to every user of the machine (ps); keys
    # come from RECSYS_API_KEYS or the settings file.
    parser.add_argument(
        "--insecure",
        action="store_true",
        # None, not False, when absent: the settings file and the environment then decide
        default=None,
        help="serve HTTP on a non-loopback --http-host without API keys (RECSYS_API_KEYS)",
    )
    parser.add_argument("--subject-prefix", help="first token of every subject (default recsys)")


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """Every settings flag: for the commands that run the agent or publish to its streams."""
    add_pipeline_flags(parser)
    add_service_flags(parser)


def settings_from_args(args: argparse.Namespace, defaults: Mapping[str, Any] | None = None) -> Settings:
    """Settings from the TOML file, the environment, then the flags given (later wins).

    ``defaults``: the command's values for flags not given; like a flag, they win over the file
    and the environment.
    """
    overrides: dict[str, Any] = dict(defaults or {})
    for key in SETTINGS_FLAGS:
        value = getattr(args, key, None)
        if value is not None:
            overrides[key] = value
    return load_settings(getattr(args, "config", None), overrides=overrides)


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
