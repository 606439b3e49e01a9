"""Strict pydantic models for user input, and their errors as one line per problem.

Every spec model (the cell, a grid's run settings, dataset and model options)
derives from :class:`Strict`: an unknown key is an error, nothing is coerced
(an int is a number, but neither ``"5"`` nor ``true`` is an int) and a model
is frozen once built. :class:`Range` and :class:`Matches` are the constraints
the specs share; each says what it allows in its error and in the JSON Schema.

:func:`error_lines` turns a pydantic ``ValidationError`` into this project's
lines, ``<path>: <what is wrong>; allowed: ...``, the path spelled as in the
spec (``batch_size[3]``, ``dataset.options.augment``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import PydanticCustomError, core_schema

from .inputs import shown


class Strict(BaseModel):
    """Base of every spec model: unknown keys are errors, types are strict, instances are frozen."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def invalid(message: str) -> PydanticCustomError:
    """An error whose text is ``message`` as written (raise it from a validator)."""
    return PydanticCustomError("invalid", "{message}", {"message": message})


@dataclass(frozen=True)
class Range:
    """A number's allowed interval, checked with a message that states it, and written into the JSON Schema."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self._check, handler(source))

    def __get_pydantic_json_schema__(self, schema: Any, handler: Any) -> dict:
        out = handler(schema)
        if self.low is not None:
            out["exclusiveMinimum" if self.low_open else "minimum"] = self.low
        if self.high is not None:
            out["exclusiveMaximum" if self.high_open else "maximum"] = self.high
        return out

    def _check(self, value: float) -> float:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        if above and below and math.isfinite(value):
            return value
        if self.high is not None and self.low is not None:
            interval = f"{'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
            raise invalid(f"{value} is outside {interval}")
        if self.low == 0 and self.low_open:
            raise invalid(f"must be a positive {'integer' if isinstance(value, int) else 'number'}, got {value}")
        bound = f">{'' if self.low_open else '='} {self.low}" if self.low is not None else \
            f"<{'' if self.high_open else '='} {self.high}"
        raise invalid(f"must be {bound}, got {value}")


@dataclass(frozen=True)
class Matches:
    """A string that must match ``pattern`` (and fit its length bounds); the error says it is not ``what``."""

    pattern: str
    what: str
    max_length: int | None = None
    min_length: int = 0

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self._check, handler(source))

    def __get_pydantic_json_schema__(self, schema: Any, handler: Any) -> dict:
        out = handler(schema)
        out["pattern"] = self.pattern
        if self.max_length is not None:
            out["maxLength"] = self.max_length
        if self.min_length:
            out["minLength"] = self.min_length
        return out

    def _check(self, value: str) -> str:
        fits = self.min_length <= len(value) <= (len(value) if self.max_length is None else self.max_length)
        if fits and re.fullmatch(self.pattern, value):
            return value
        raise invalid(f"{shown(value)} is not {self.what}")


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
PositiveInt = Annotated[int, POSITIVE]
PositiveFloat = Annotated[float, POSITIVE]
NonNegativeInt = Annotated[int, NON_NEGATIVE]
NonNegativeFloat = Annotated[float, NON_NEGATIVE]


# ---- pydantic's errors as one line each ----------------------------------------------------------

#: What a value of the wrong type should have been, by pydantic error type.
_WANTED = {
    "int_type": "an integer", "int_from_float": "an integer", "int_parsing": "an integer",
    "float_type": "a number", "float_parsing": "a number",
    "bool_type": "true or false", "bool_parsing": "true or false",
    "string_type": "a string",
    "dict_type": "a mapping", "model_type": "a mapping", "model_attributes_type": "a mapping",
    "list_type": "a list",
}


def error_lines(err: ValidationError, path: str, root: type[BaseModel], unknown: str = "unknown field") -> list[str]:
    """One line per error of ``err`` (raised validating ``root``), each prefixed by ``path`` plus its location.

    ``unknown`` is how an unknown key is described (``"unknown option for model 'lstm'"``).
    """
    out = []
    for e in err.errors(include_url=False):
        loc, kind, value = e["loc"], e["type"], e.get("input")
        if kind == "extra_forbidden":
            allowed = ", ".join(_type_at(root, loc[:-1]).model_fields) or "none"
            message = f"{unknown}; allowed: {allowed}"
        elif kind == "missing":
            message = "required field is missing"
        elif kind == "literal_error":
            names = [p for p in _untagged(root, loc) if isinstance(p, str)]
            noun = names[-2] if len(names) > 1 and names[-1] == "name" else names[-1]
            choices = ", ".join(str(c) for c in get_args(_type_at(root, loc)))
            message = f"unknown {noun.replace('_', ' ')} {shown(value)}; allowed: {choices}"
        elif kind in _WANTED:
            got = type(value).__name__ if _WANTED[kind] in ("a mapping", "a list") else shown(value)
            message = f"must be {_WANTED[kind]}, got {got}"
        elif kind in ("too_short", "too_long"):
            ctx = e.get("ctx", {})
            bound = f"at least {ctx['min_length']}" if kind == "too_short" else f"at most {ctx['max_length']}"
            message = f"must list {bound} values, got {shown(value)}"
        else:
            message = e["msg"]
        out.append(f"{location(path, _untagged(root, loc))}: {message}")
    return out


def location(path: str, loc: tuple) -> str:
    """``path`` extended by a pydantic location: ``("batch_size", 3)`` -> ``batch_size[3]``."""
    for part in loc:
        path = f"{path}[{part}]" if isinstance(part, int) else f"{path}.{part}" if path else str(part)
    return path


def _strip(tp: Any) -> Any:
    """``tp`` without ``Annotated`` metadata and without ``None`` in a union."""
    while True:
        if get_origin(tp) is Annotated:
            tp = get_args(tp)[0]
        elif get_origin(tp) in (Union, type(int | None)) and type(None) in get_args(tp):
            rest = [a for a in get_args(tp) if a is not type(None)]
            tp = rest[0] if len(rest) == 1 else Union[tuple(rest)]
        else:
            return tp


def _tagged(tp: Any) -> dict[str, Any]:
    """The members of a union chosen by a tag (pydantic's ``Tag``), by tag; {} for any other type."""
    if get_origin(tp) is not Union:
        return {}
    out = {}
    for arg in get_args(tp):
        tag = next((m.tag for m in getattr(arg, "__metadata__", ()) if type(m).__name__ == "Tag"), None)
        if tag is None:
            return {}
        out[tag] = get_args(arg)[0]
    return out


def _untagged(root: Any, loc: tuple) -> tuple:
    """``loc`` without the tags pydantic puts after a tagged union's field (``optimizer.adamw.beta2`` ->
    ``optimizer.beta2``): the spec the user wrote has no such level."""
    out, tp = [], root
    for part in loc:
        tp = _strip(tp)
        members = _tagged(tp)
        if members and part in members:
            tp = members[part]
            continue
        out.append(part)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            tp = tp.model_fields[part].annotation if part in tp.model_fields else Any
        else:
            args = get_args(tp)
            tp = args[-1] if args else Any
    return tuple(out)


def _type_at(root: Any, loc: tuple) -> Any:
    """The annotation of the field at ``loc`` under model ``root`` (list indices and mapping keys followed)."""
    tp = root
    for part in loc:
        tp = _strip(tp)
        members = _tagged(tp)
        if members and part in members:
            tp = members[part]
            continue
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            tp = tp.model_fields[part].annotation
        else:  # list[T] (an index) or dict[str, T] (a key)
            tp = get_args(tp)[-1]
    return _strip(tp)
