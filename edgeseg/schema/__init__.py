"""The published JSON Schema of `manifest.json` (manifest.schema.json beside this file).

It is the one definition of what a manifest may hold: `edgeseg.bundle` validates every manifest it
reads or writes against it, the vocabularies below (backends, tasks, output kinds, layouts ...)
are read from it, and device apps (Swift, C++) can validate with it too (docs/bundle.md).
Imports nothing from edgeseg, so every part can use it.
"""
from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any, Iterator, NamedTuple

SCHEMA_FILE = "manifest.schema.json"
MISSING = object()  # the value of a required field that is absent


@functools.lru_cache(maxsize=1)
def load_schema() -> dict:
    return json.loads(resources.files(__name__).joinpath(SCHEMA_FILE).read_text(encoding="utf-8"))


def enum(name: str) -> tuple[str, ...]:
    """The allowed values of one vocabulary in the schema's `$defs` (e.g. "backend")."""
    return tuple(load_schema()["$defs"][name]["enum"])


class Problem(NamedTuple):
    """One way a manifest breaks the schema: where (a JSON path such as $.artifacts[0].sha256),
    the offending value, what is wrong, and what the field should hold."""

    path: str
    value: Any
    message: str
    expected: str

    def __str__(self) -> str:
        head = f"{self.path}: {self.message}" if self.value is MISSING else f"{self.path} = {_short(self.value)}: {self.message}"
        return head + (f" (expected {self.expected})" if self.expected else "")


@functools.lru_cache(maxsize=4)
def _validator(backends: tuple[str, ...] | None):
    import copy

    from jsonschema.validators import validator_for

    schema = load_schema()
    if backends is not None and set(backends) != set(enum("backend")):
        schema = copy.deepcopy(schema)
        schema["$defs"]["backend"]["enum"] = list(backends)
    cls = validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def problems(data: Any, backends: tuple[str, ...] | None = None) -> list[Problem]:
    """Every schema violation of `data`, most relevant first (empty when it is a valid manifest).
    backends: the backend names to accept instead of the file's list (edgeseg passes its engine
    registry's, which a test keeps equal to the published file)."""
    from jsonschema.exceptions import relevance

    return [_problem(e) for e in sorted(_validator(tuple(backends) if backends else None).iter_errors(data), key=relevance)]


def _problem(error) -> Problem:
    path = list(error.absolute_path)
    value = error.instance
    if error.validator == "required":
        missing = next((k for k in error.validator_value if isinstance(error.instance, dict) and k not in error.instance), None)
        path.append(missing)
        sub = _subschema(error.schema.get("properties", {}).get(missing, {}))
        return Problem(json_path(path), MISSING, "missing required field", sub.get("description", ""))
    schema = _subschema(error.schema)
    expected = schema.get("description", "")
    if error.validator in ("pattern", "oneOf", "minLength", "maxLength") and expected:
        message = "not allowed"  # the description says what is
    elif error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {}))) if isinstance(error.instance, dict) else []
        message = f"unknown field(s) {', '.join(map(repr, extra))}"
        expected = "only the fields the schema lists"
    else:
        message = error.message
    return Problem(json_path(path), value, message, expected)


def _subschema(s: dict) -> dict:
    """Follow a local $ref (for its description)."""
    ref = s.get("$ref") if isinstance(s, dict) else None
    if ref and ref.startswith("#/$defs/"):
        return load_schema()["$defs"][ref.rsplit("/", 1)[1]]
    return s if isinstance(s, dict) else {}


def json_path(parts) -> str:
    out = "$"
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def walk(data: Any) -> Iterator[tuple[tuple, Any]]:
    """(path parts, value) of every node, iteratively (no recursion limit on hostile nesting)."""
    stack = [((), data)]
    while stack:
        path, value = stack.pop()
        yield path, value
        if isinstance(value, dict):
            stack.extend((path + (k,), v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((path + (i,), v) for i, v in enumerate(value))


__all__ = ["load_schema", "enum", "problems", "Problem", "json_path", "walk", "SCHEMA_FILE"]
