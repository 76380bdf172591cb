"""The configuration's building blocks (tasks/config.py): the error that lists every problem at once, and the
section base class (unknown keys rejected, YAML booleans kept out of number fields). Imports stay light (pydantic)."""

from __future__ import annotations

from typing import get_args

from pydantic import BaseModel, ConfigDict, field_validator


class ConfigError(ValueError):
    """A configuration problem; `problems` lists (field path, message) pairs, all at once."""

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None):
        self.problems = problems
        self.source = source
        where = f" in {source}" if source else ""
        lines = [f"invalid configuration{where} ({len(problems)} problem{'s' * (len(problems) != 1)}):"]
        lines += [f"  - {path}: {msg}" for path, msg in problems]
        super().__init__("\n".join(lines))


def _allows_bool(annotation) -> bool:
    return annotation is bool or bool in get_args(annotation)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_yaml_booleans_for_numbers(cls, v, info):
        """YAML reads yes/no/on/off as booleans; a number field must not take True as 1."""
        field = cls.model_fields.get(info.field_name)
        if isinstance(v, bool) and field is not None and not _allows_bool(field.annotation):
            raise ValueError(
                f"expected {field.annotation!s} but got the boolean {v} (YAML reads yes/no/on/off as "
                "booleans); fix: write the value you mean"
            )
        return v
