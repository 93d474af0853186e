"""Reading pdserve's YAML files (cluster config, autoscaling policy) with errors an operator
can act on: the file, the line's problem, or every bad field by its dotted path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError


def read_mapping(path: Path, what: str, error: type[Exception]) -> dict[str, Any] | None:
    """The YAML mapping in `path` (None for an empty file), or `error` saying why not."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise error(f"cannot read {what} {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise error(f"{path} is not valid YAML: {err}") from None
    if data is not None and not isinstance(data, dict):
        raise error(f"{path} must hold a mapping of settings, got {type(data).__name__}")
    return data


def describe(err: ValidationError) -> str:
    """One line per problem: `  decode.replicas: Input should be greater than or equal to 1`."""
    return "\n".join(f"  {'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in err.errors())
