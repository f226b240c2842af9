"""Reading the TrainerConfig the operator (or `kubetune train --local`) wrote."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from kubetune.api.trainer import TrainerConfig
from kubetune_trainer.errors import InputNotFound, InvalidConfig

M = TypeVar("M", bound=BaseModel)


def format_validation_error(err: ValidationError) -> str:
    """pydantic errors as `field.path: message` lines."""
    lines = []
    for item in err.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(root)"
        lines.append(f"{where}: {item['msg']}")
    return "\n".join(lines)


def load_config(
    path: str | Path, model: type[M] = TrainerConfig, what: str = "trainer config"
) -> M:
    """Parse a configuration (a TrainerConfig unless told otherwise) from a JSON or YAML
    file."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFound(f"{what} {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
        document = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as err:
        raise InvalidConfig(f"{what} {path} cannot be read: {err}") from err
    if not isinstance(document, dict):
        raise InvalidConfig(f"{what} {path} must be a mapping")
    try:
        return model.model_validate(document)
    except ValidationError as err:
        raise InvalidConfig(f"{what} {path} is invalid:\n{format_validation_error(err)}") from err
