"""The cluster config and the model checkpoint a command runs with, or exit 2 saying why not:
shared by the commands that deploy or measure a service."""

from __future__ import annotations

import sys


def config_or_exit(path: str | None, command: str):
    """The validated cluster config, or exit 2 with every problem listed."""
    from pdserve.config.cluster import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as err:
        print(f"pdserve {command}: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def model_path_or_exit(cfg, command: str) -> str:
    """The checkpoint directory of `cfg.model` ("default": the embedded model), or exit 2 saying why not."""
    from pdserve.model_store import ModelNotFoundError, resolve_model

    try:
        return str(resolve_model(None if cfg.model == "default" else cfg.model))
    except ModelNotFoundError as err:
        print(f"pdserve {command}: {err}", file=sys.stderr)
        raise SystemExit(2) from None
