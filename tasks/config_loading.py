"""Loading a run configuration: YAML (duplicate keys are errors), `--set section.key=value` overrides, and
validation that reports every problem at once (field errors and cross-field contradictions together).

`load_config(path, overrides)` -> RunConfig, or one ConfigError listing every problem with its field path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tasks.config import ConfigError, RunConfig
from tasks.config_checks import Unknown, cross_field_problems


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (the second `model:` would replace the first)."""


def _mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (line {key_node.start_mark.line + 1}; first on line {seen[key]}): "
                "the second would silently replace the first; fix: keep one",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def read_yaml(text: str):
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=c` -> (["a", "b"], parsed c); the value is parsed as YAML (numbers, bools, lists)."""
    if "=" not in item:
        raise ConfigError([(item, "an override must look like section.key=value")])
    key, raw = item.split("=", 1)
    keys = [k for k in key.strip().split(".")]
    if not all(keys):
        raise ConfigError([(key, "empty key in override path")])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return keys, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `--set` overrides to a raw config dict (a sub-key replaces a scalar with a mapping)."""
    for item in overrides:
        keys, value = parse_override(item)
        node = raw
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    return raw


def _section_type(model: type[BaseModel] | None, item) -> type[BaseModel] | None:
    if model is None or item not in model.model_fields:
        return None
    ann = model.model_fields[item].annotation
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _format_loc(loc: tuple) -> str:
    """A pydantic error location as a field path (a.b.c[0]), without pydantic's union-branch tags."""
    parts: list[str] = []
    model: type[BaseModel] | None = RunConfig
    for item in loc:
        if isinstance(item, int):
            if parts:
                parts[-1] += f"[{item}]"
            continue
        if model is not None:
            parts.append(str(item))
            model = _section_type(model, item)
    return ".".join(parts) or "(top level)"


def _fields_at(loc: tuple) -> list[str]:
    """The field names of the config section at `loc` (for 'unknown key' messages)."""
    model: type[BaseModel] = RunConfig
    for item in loc:
        sub = _section_type(model, item)
        if sub is None:
            break
        model = sub
    return list(model.model_fields)


class _Partial:
    """The values that parsed, by dotted path (defaults where a key is absent); the ones that did not are Unknown."""

    def __init__(self, raw: dict, bad: set[str]):
        self.raw, self.bad = raw, bad

    def get(self, path: str):
        if any(path == b or path.startswith(b + ".") or b.startswith(path + ".") for b in self.bad):
            raise Unknown(path)
        node: Any = self.raw
        model: type[BaseModel] | None = RunConfig
        for part in path.split("."):
            if isinstance(node, dict) and part in node:
                node = node[part]
            else:
                field = model.model_fields[part] if model is not None else None
                if field is None:
                    raise Unknown(path)
                node = field.get_default(call_default_factory=True)
            model = _section_type(model, part)
            if isinstance(node, BaseModel):
                node = node.model_dump()
        return node

    def set_fields(self, section: str) -> set[str]:
        node: Any = self.raw
        for part in section.split("."):
            node = node.get(part, {}) if isinstance(node, dict) else {}
        return set(node) if isinstance(node, dict) else set()


def validate_config(raw: dict, source: str | None = None) -> RunConfig:
    """Validate a raw dict; raise one ConfigError listing every problem (field and cross-field) with its path."""
    if not isinstance(raw, dict):
        raise ConfigError([("(top level)", f"expected a mapping of sections, got {type(raw).__name__}")], source)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        problems: list[tuple[str, str]] = []
        bad: set[str] = set()
        for err in exc.errors():
            if not err["loc"]:  # the cross-field check of a config whose fields all parsed: listed below
                continue
            path = _format_loc(err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = f"unknown key; valid keys here: {', '.join(_fields_at(err['loc'][:-1]))}"
            bad.add(path.split("[")[0])
            if (path, msg) not in problems:
                problems.append((path, msg))
        partial = _Partial(raw, bad)
        problems += [p for p in cross_field_problems(partial.get, partial.set_fields) if p not in problems]
        raise ConfigError(problems, source) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or the defaults when path is None), apply overrides, validate once."""
    raw: dict = {}
    source = None
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError([("(file)", f"config file {p} does not exist")], source)
        try:
            raw = read_yaml(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError([("(file)", f"not valid YAML: {exc}")], source) from None
        if not isinstance(raw, dict):
            raise ConfigError([("(top level)", "the YAML file must hold a mapping of sections")], source)
    raw = apply_overrides(raw, overrides or [])
    return validate_config(raw, source)
