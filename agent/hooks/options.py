"""Plugin options: one parser for every plugin's ``[plugins.<name>]`` table.

A plugin declares its options as a dataclass with defaults; the parser refuses unknown keys and
values of the wrong type with a ConfigError naming the table and the key, so a misspelt option
stops the start (configuration-error status) instead of being ignored. Range checks live with the
options: a ``problems()`` method returns ``(option, message)`` pairs for what is wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from typing import Any, TypeVar, get_type_hints

from agent.config import ConfigError, coerce_option

OptionsT = TypeVar("OptionsT")


def parse_options(cls: type[OptionsT], raw: Mapping[str, Any], plugin: str) -> OptionsT:
    """``raw`` (a plugin's TOML table) as an instance of the dataclass ``cls``."""
    if not is_dataclass(cls):
        raise TypeError(f"plugin {plugin}: options must be declared as a dataclass, not {cls!r}")
    section = f"plugins.{plugin}"
    # an option whose TOML key is no Python name (``lambda``) says so in its field's metadata
    by_key = {f.metadata.get("option", f.name): f.name for f in fields(cls)}
    kinds = get_type_hints(cls)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in by_key:
            listed = ", ".join(sorted(by_key)) or "none"
            raise ConfigError(f"[{section}] has no option '{key}' (options: {listed})")
        # plugin tables come from TOML, typed already: "2" is not read as an integer
        name = by_key[key]
        values[name] = coerce_option(f"[{section}] option '{key}'", kinds[name], value, parse_strings=False)
    options = cls(**values)
    problems = getattr(options, "problems", None)
    for option, message in problems() if callable(problems) else ():
        raise ConfigError(f"[{section}] option '{option}' {message}")
    return options
