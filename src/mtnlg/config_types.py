"""Checking a config value against its dataclass annotation (int -> float allowed), a choice, or a CLI value's
text (parsed as YAML would), with one-line errors."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import yaml

from mtnlg.errors import ConfigError, did_you_mean


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def check_type(key: str, value: Any, tp: Any) -> Any:
    """Return ``value`` converted to annotation ``tp`` (int -> float allowed) or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return check_type(key, value, a)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is Any:
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
        (inner,) = typing.get_args(tp) or (Any,)
        return [check_type(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def parse_value(text: str) -> Any:
    """Parse a CLI value the way YAML would (``1e-3`` -> float, ``[3,5]`` -> list, ``none`` -> None)."""
    if text.strip().lower() in ("none", "null", "~"):
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" as a string
            return float(value) if any(c.isdigit() for c in value) and value.lower().lstrip("+-") not in ("inf", "nan") else value
        except ValueError:
            return value
    return value


def choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}='{value}' is not one of {list(choices)}" + did_you_mean(value, choices))


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Apply ``section.key=value`` (or ``--section.key=value``) strings to ``cfg`` (a dataclass of section
    dataclasses: :class:`mtnlg.config.Config`) in place."""
    sections = tuple(f.name for f in dataclasses.fields(cfg))
    all_keys = [f"{s}.{f.name}" for s in sections for f in dataclasses.fields(getattr(cfg, s))]
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            raise ConfigError(f"override '{item}' must look like --section.key=value")
        key, raw = text.split("=", 1)
        if "." not in key:
            raise ConfigError(f"override '{item}' must name a section and a key, e.g. --train.steps=10"
                              + did_you_mean(key, all_keys))
        section, name = key.split(".", 1)
        if section not in sections:
            raise ConfigError(f"unknown key '{key}': no section '{section}' (sections: {', '.join(sections)})"
                              + did_you_mean(key, all_keys))
        sub = getattr(cfg, section)
        hints = typing.get_type_hints(type(sub))
        if name not in hints:
            raise ConfigError(f"unknown key '{key}'" + did_you_mean(key, all_keys))
        try:
            value = check_type(key, parse_value(raw), hints[name])
        except ConfigError:
            value = check_type(key, raw, hints[name])  # e.g. a str field given "12345"
        setattr(sub, name, value)
    return cfg
