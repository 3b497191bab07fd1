"""Settings from the command line, shared by the ``recsys-agent`` sub-commands."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from agent.config import Settings, load_settings


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML settings file")
    parser.add_argument("--data-dir", help="where JetStream and Qdrant keep their files")
    parser.add_argument("--nats-url", help="use this NATS server or cluster instead of spawning one")
    parser.add_argument("--nats-port", help="port of the spawned nats-server (0: any free port)")
    parser.add_argument("--qdrant-url", help="use this Qdrant server or cluster instead of the local store in the data dir")
    parser.add_argument("--embedding-model", help="sentence-transformers model (default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--http-host", help="address of the HTTP API")
    parser.add_argument("--http-port", help="port of the HTTP API (0: any free port)")
    parser.add_argument("--subject-prefix", help="first token of every subject (default recsys)")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {
        key: getattr(args, key, None)
        for key in (
            "data_dir", "nats_url", "nats_port", "qdrant_url", "embedding_model",
            "http_host", "http_port", "subject_prefix", "log_level",
        )
    }
    return load_settings(getattr(args, "config", None), overrides=overrides)


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
