"""Read settings from MAILKUBE_* environment variables over an optional YAML file.

Environment wins over the file. Nested fields use a double underscore
(MAILKUBE_SMART_HOST__HOST). Unknown MAILKUBE_* variables are ignored on purpose: Kubernetes
service links inject variables such as MAILKUBE_REDIS_PORT for a Service named mailkube-redis.
Unknown keys in the file are errors (a typo must not pass silently). The file may be shared by
all components: a key is known if any component's settings have it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from .models import ALL_SETTINGS, CommonSettings

ENV_PREFIX = "MAILKUBE_"
CONFIG_ENV = "MAILKUBE_CONFIG"
_SECRET_WORDS = ("password", "secret", "token", "key")

S = TypeVar("S", bound=CommonSettings)


class SettingsError(Exception):
    """Invalid settings; str() is one line per problem, each naming the field."""


def load_settings(
    model: type[S],
    *,
    config_file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> S:
    environ = os.environ if environ is None else environ
    config_file = config_file or environ.get(CONFIG_ENV) or None
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if config_file:
        values = _read_file(Path(config_file))
        sources = {key: f"{key} in {config_file}" for key in values}
        known = set().union(*(m.model_fields for m in ALL_SETTINGS))
        unknown = sorted(str(k) for k in set(values) - known)
        if unknown:
            raise SettingsError(
                "\n".join(
                    f"invalid setting {k} (in {config_file}): unknown setting" for k in unknown
                )
            )
        values = {k: v for k, v in values.items() if k in model.model_fields}
    for name, value in _from_env(model, environ).items():
        if isinstance(value, dict) and isinstance(values.get(name), dict):
            value = {**values[name], **value}  # MAILKUBE_SMART_HOST__PORT keeps the file's host
        values[name] = value
        sources[name] = f"{ENV_PREFIX}{name.upper()}"
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise SettingsError(_describe(exc, sources)) from None


def load_settings_or_exit(model: type[S], prog: str, config_file: str | Path | None = None) -> S:
    """For entry points: the settings, or one line per problem on stderr and exit status 2."""
    try:
        return load_settings(model, config_file=config_file)
    except SettingsError as exc:
        _exit(prog, str(exc))


def _exit(prog: str, message: str) -> NoReturn:
    for line in message.splitlines():
        print(f"{prog}: {line}", file=sys.stderr)
    raise SystemExit(2)


def _read_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SettingsError(f"cannot read settings file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        # only the position and the parser's own words: the offending line may hold a secret
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise SettingsError(f"settings file {path} is not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"settings file {path} must hold a mapping of setting: value")
    return data


def _from_env(model: type[BaseModel], environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for var, raw in environ.items():
        if not var.startswith(ENV_PREFIX) or var == CONFIG_ENV:
            continue
        path = var[len(ENV_PREFIX) :].lower().split("__")
        if path[0] not in model.model_fields:
            continue
        target = values
        for part in path[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                break
        else:
            target[path[-1]] = raw
    return values


def _describe(exc: ValidationError, sources: Mapping[str, str]) -> str:
    lines = []
    for error in exc.errors(include_url=False):
        loc = error["loc"]
        message = str(error["msg"]).removeprefix("Value error, ")
        if not loc:
            lines.append(f"invalid settings: {message}")
            continue
        field = ".".join(str(part) for part in loc)
        source = sources.get(str(loc[0]))
        if source and source.startswith(ENV_PREFIX):
            # name the variable of a nested model's field; list indexes stay in the one variable
            names = [str(part) for part in loc if not isinstance(part, int)]
            source = ENV_PREFIX + "__".join(names).upper()
        where = f" (from {source})" if source and error["type"] != "missing" else ""
        shown = ""
        value = error.get("input")
        secret = any(word in field.lower() for word in _SECRET_WORDS)
        if isinstance(value, str | int | float) and not secret and repr(value) not in message:
            shown = f", got {value!r}"
        lines.append(f"invalid setting {field}{where}: {message}{shown}")
    return "\n".join(lines)
