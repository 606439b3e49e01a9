"""Raw input read before it is validated: text files, JSON objects, values shown in messages.

Every way a grid or a cell arrives (a grid file, ``--cell`` inline or from a file, a store's
``sweep.yaml`` or ``cell.json``) is read through here, so a binary file, a key written twice, a document
nested thousands deep or a value megabytes long gives one line naming the source, not a traceback or
pages of output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import ConfigError

#: How deep a grid or a cell may nest mappings and lists (a real one nests 4 deep at most).
MAX_DEPTH = 64
#: Characters of a value quoted in an error message.
MAX_SHOWN = 80


def clip(text: str) -> str:
    """``text`` cut to about MAX_SHOWN characters: a message names a value, it does not reproduce it."""
    return text if len(text) <= MAX_SHOWN else f"{text[:MAX_SHOWN - 20]}... ({len(text)} characters)"


def shown(value: Any) -> str:
    """``repr(value)``, cut as :func:`clip` cuts."""
    return clip(repr(value))


def decode(data: bytes, where: str) -> str:
    """``data`` as UTF-8 text; ConfigError naming ``where`` and the first byte that is not."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{where}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})") from None


def read_text(path: Path, where: str) -> str:
    """The text of the file at ``path``; ConfigError naming ``where`` for a directory, a missing or
    unreadable file, or bytes that are not UTF-8."""
    if path.is_dir():
        raise ConfigError(f"{where}: {str(path)!r} is a directory; give a file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file {str(path)!r}") from None
    except OSError as err:
        raise ConfigError(f"{where}: cannot read {str(path)!r} ({err.strerror or err})") from None
    return decode(data, f"{where} {str(path)!r}")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {shown(key)} appears twice in one object; a key may appear once")
        out[key] = value
    return out


def json_object(text: str, where: str) -> dict[str, Any]:
    """The JSON object in ``text``; ConfigError naming ``where`` when it is not JSON, not an object, repeats
    a key in an object (JSON would keep the last silently) or nests deeper than MAX_DEPTH."""
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys)
    except RecursionError:
        data = None
        deep = True
    except ValueError as err:  # JSONDecodeError, a repeated key
        raise ConfigError(f"{where}: not valid JSON ({clip(str(err))})") from None
    else:
        deep = depth(data) > MAX_DEPTH
    if deep:
        raise ConfigError(f"{where}: nested deeper than {MAX_DEPTH} levels")
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a JSON object, got {type(data).__name__}")
    return data


def depth(value: Any) -> int:
    """How deep ``value`` nests lists and mappings (a scalar: 0), counted without recursion."""
    deepest, todo = 0, [(value, 0)]
    while todo:
        item, level = todo.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            deepest = max(deepest, level)
            continue
        deepest = max(deepest, level + 1)
        if level + 1 > MAX_DEPTH:
            return level + 1
        todo.extend((child, level + 1) for child in children)
    return deepest


def output_dir(path: str, where: str) -> Path:
    """``path`` as a directory that can be made (checked before any work is done); ConfigError naming
    ``where`` when it, or a folder above it, is a file."""
    out = Path(path).expanduser()
    if any(p.exists() and not p.is_dir() for p in (out, *out.parents)):
        raise ConfigError(f"{where}: {shown(path)} is at or under a file; give a directory")
    return out
