"""Addressing one value inside a fit config: `trainer.callbacks[PruningCallback].init_args.ratios["layer1.*.conv1"]`.

jsonargparse (LightningCLI's parser) can set init args of the *last* callback of a list from the
command line (`--trainer.callbacks.norm=1`), but neither a callback in the middle of the list nor a
dictionary key that contains dots (the layer patterns of paper 002's groups). A sweep needs both,
so a trial's value is written into a complete copy of the config at a path of this syntax:

| segment | on a mapping | on a list |
|---|---|---|
| `.name` (or the first name) | the key `name` | - |
| `["any.key"]`, `['any.key']` | the key, dots and stars allowed | - |
| `["key.a", "key.b"]` (last segment only) | several keys holding one value, set together | - |
| `[3]`, `[-1]` | - | the item at that index |
| `[PruningCallback]` | the key `PruningCallback` | the one item whose `class_path` is that class (see below) |

A class in a bracket may be given by its short name or its full path.

Several keys in one bracket tie them: paper 002's layer-2 group may be written as two patterns
(`"layer2.[1-4].conv1"`, `"layer2.[67].conv1"`) and is still one searched sparsity.
A mapping with `class_path`/`init_args` (a class given in YAML) may be addressed without the
`init_args` step, as jsonargparse allows on the command line: `trainer.callbacks[PruningCallback].norm`.
Values are looked up in a config as plain data (the dump of a parsed config, see
`compresslight.sweep.fitconfig`), so every argument the CLI accepts is present with its default.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
from collections.abc import Iterator
from typing import Any

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NAME = re.compile(r"[^.\[\]]+")
_INDEX = re.compile(r"^-?\d+$")


@dataclasses.dataclass(frozen=True)
class Key:
    """A mapping key (`.name` or a quoted `["name"]`)."""

    name: str


@dataclasses.dataclass(frozen=True)
class Keys:
    """Several keys of one mapping that hold one value (`["a", "b"]`, the last segment only)."""

    names: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Index:
    """A list index (`[3]`)."""

    index: int


@dataclasses.dataclass(frozen=True)
class Selector:
    """An unquoted bracket (`[PruningCallback]`): a class among a list's items, or a mapping key."""

    name: str


Segment = Key | Keys | Index | Selector


def parse_path(path: str) -> list[Segment]:
    """Splits a config path into segments.

    Args:
        path: e.g. `model.lr`, `trainer.callbacks[0].init_args.norm` or
            `trainer.callbacks[PruningCallback].init_args.ratios["layer1.*.conv1"]`.

    Raises:
        ValueError: if `path` is empty or malformed (unclosed bracket, empty name, stray dot).
    """
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"A config path must be a non-empty string, got {path!r}.")
    segments: list[Segment] = []
    position = 0
    while position < len(path):
        char = path[position]
        if char == "[":
            if path[position + 1 : position + 2] in ("'", '"'):
                names, position = _quoted_keys(path, position)
                segments.append(Key(names[0]) if len(names) == 1 else Keys(tuple(names)))
            else:
                end = path.find("]", position + 1)
                if end < 0:
                    raise ValueError(f"Config path {path!r}: the bracket at position {position} is not closed.")
                inner = path[position + 1 : end].strip()
                if not inner:
                    raise ValueError(f"Config path {path!r}: empty brackets at position {position}.")
                segments.append(Index(int(inner)) if _INDEX.match(inner) else Selector(inner))
                position = end + 1
            continue
        if char == ".":
            if not segments:
                raise ValueError(f"Config path {path!r} must not start with a dot.")
            position += 1
        elif segments:
            raise ValueError(f"Config path {path!r}: expected '.' or '[' at position {position}, found {char!r}.")
        match = _NAME.match(path, position)
        if match is None:
            raise ValueError(f"Config path {path!r}: expected a name at position {position}.")
        segments.append(Key(match.group()))
        position = match.end()
    if any(isinstance(segment, Keys) for segment in segments[:-1]):
        raise ValueError(f"Config path {path!r}: several keys in one bracket are allowed in the last segment only.")
    return segments


def _quoted_keys(path: str, position: int) -> tuple[list[str], int]:
    """Reads `["a"]` or `["a", 'b', ...]` starting at the bracket; returns the keys and the position after it."""
    names = []
    position += 1
    while True:
        quote = path[position : position + 1]
        if quote not in ("'", '"'):
            raise ValueError(f"Config path {path!r}: expected a quoted key at position {position}.")
        end = path.find(quote, position + 1)
        if end < 0:
            raise ValueError(f"Config path {path!r}: the quoted key at position {position} has no closing {quote}.")
        names.append(path[position + 1 : end])
        position = end + 1
        while path[position : position + 1] == " ":
            position += 1
        separator = path[position : position + 1]
        if separator == "]":
            return names, position + 1
        if separator != ",":
            raise ValueError(f"Config path {path!r}: expected ',' or ']' after the quoted key at position {end}.")
        position += 1
        while path[position : position + 1] == " ":
            position += 1


def format_path(segments: list[Segment]) -> str:
    """The canonical text of `segments` (`.name` for identifiers, `["key"]` otherwise)."""
    text = ""
    for segment in segments:
        if isinstance(segment, Keys):
            text += "[" + ", ".join(f'"{name}"' for name in segment.names) + "]"
        elif isinstance(segment, Index):
            text += f"[{segment.index}]"
        elif isinstance(segment, Selector):
            text += f"[{segment.name}]"
        elif _IDENTIFIER.match(segment.name):
            text += ("." if text else "") + segment.name
        else:
            text += f'["{segment.name}"]'
    return text


def get_at_path(config: Any, path: str) -> Any:
    """The value at `path` in `config` (plain dicts and lists).

    Raises:
        ValueError: if `path` is malformed or names nothing in `config`; the message lists the
            closest existing paths.
    """
    container, keys = _resolve_parent(config, path)
    values = [container[key] for key in keys]
    if any(value != values[0] for value in values[1:]):
        held = {str(key): value for key, value in zip(keys, values)}
        raise ValueError(
            f"Config path {path!r} ties keys that hold different values ({held}); give them one value first."
        )
    return values[0]


def has_path(config: Any, path: str) -> bool:
    """Whether `path` names a value in `config`."""
    try:
        get_at_path(config, path)
    except ValueError:
        return False
    return True


def set_at_path(config: Any, path: str, value: Any) -> Any:
    """Returns a deep copy of `config` with the value at `path` replaced by `value`.

    Only existing values can be replaced: a path that names nothing is a typo, not a new key.

    Raises:
        ValueError: if `path` is malformed or names nothing in `config` (with close matches).
    """
    edited = copy.deepcopy(config)
    container, keys = _resolve_parent(edited, path)
    for key in keys:
        container[key] = copy.deepcopy(value)
    return edited


def leaf_paths(config: Any) -> list[str]:
    """The canonical paths of every value in `config` that is not a non-empty mapping or list."""
    return [format_path(segments) for segments, _ in _walk(config, [])]


def close_matches(config: Any, path: str, limit: int = 5) -> list[str]:
    """Existing paths of `config` that look like `path` (difflib ratio), best first."""
    candidates = leaf_paths(config)
    matches = difflib.get_close_matches(path, candidates, n=limit, cutoff=0.6)
    if not matches:
        # A wrong prefix hides a right ending (`callbacks[Pruning].ratios...`): also compare the
        # last segment alone.
        tail = path.replace("[", ".").replace("]", "").split(".")[-1].strip("\"'")
        matches = [c for c in candidates if c.endswith(tail) or c.endswith(f'"{tail}"]')][:limit]
    return matches


def _resolve_parent(config: Any, path: str) -> tuple[Any, list[Any]]:
    """The container holding the value(s) at `path`, and the keys or indices there."""
    segments = parse_path(path)
    node = config
    for position, segment in enumerate(segments[:-1]):
        node = _step(node, segment, segments[:position], path, config)[2]
    last = segments[-1]
    if isinstance(last, Keys):
        containers = [_step(node, Key(name), segments[:-1], path, config)[:2] for name in last.names]
        if any(container is not containers[0][0] for container, _ in containers):
            raise ValueError(f"Config path {path!r}: the tied keys must be in one mapping.")
        return containers[0][0], [key for _, key in containers]
    container, key, _ = _step(node, last, segments[:-1], path, config)
    return container, [key]


def _step(node: Any, segment: Segment, done: list[Segment], path: str, config: Any) -> tuple[Any, Any, Any]:
    where = format_path(done) or "the top level"
    if isinstance(node, dict):
        if isinstance(segment, Index):
            _fail(path, config, f"{where} is a mapping, not a list: use a key instead of [{segment.index}]")
        name = segment.name
        if name in node:
            return node, name, node[name]
        init_args = node.get("init_args")
        if "class_path" in node and isinstance(init_args, dict) and name in init_args:
            return init_args, name, init_args[name]
        _fail(path, config, f"{where} has no key {name!r} (keys: {sorted(map(str, node))})")
    if isinstance(node, list):
        if isinstance(segment, Index):
            if not -len(node) <= segment.index < len(node):
                _fail(path, config, f"{where} has {len(node)} items, index {segment.index} is out of range")
            return node, segment.index % len(node), node[segment.index]
        if isinstance(segment, Key):
            _fail(path, config, f"{where} is a list: select an item with [index] or [ClassName], not .{segment.name}")
        matches = [
            i for i, item in enumerate(node)
            if isinstance(item, dict) and _class_matches(str(item.get("class_path", "")), segment.name)
        ]  # fmt: skip
        classes = [item.get("class_path") for item in node if isinstance(item, dict)]
        if not matches:
            _fail(path, config, f"no item of {where} has class {segment.name!r} (classes: {classes})")
        if len(matches) > 1:
            _fail(
                path,
                config,
                f"{len(matches)} items of {where} have class {segment.name!r} (at {matches}): select one by index",
            )
        return node, matches[0], node[matches[0]]
    _fail(path, config, f"{where} is a value ({node!r}), it has no {format_path([segment])!r}")
    raise AssertionError("unreachable")


def _class_matches(class_path: str, name: str) -> bool:
    return class_path == name or class_path.endswith("." + name)


def _fail(path: str, config: Any, reason: str) -> None:
    matches = close_matches(config, path)
    hint = f" Close matches: {', '.join(matches)}." if matches else ""
    raise ValueError(f"Config path {path!r} names nothing in the config: {reason}.{hint}")


def _walk(node: Any, prefix: list[Segment]) -> Iterator[tuple[list[Segment], Any]]:
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from _walk(value, prefix + [Key(str(key))])
    elif isinstance(node, list) and node:
        class_paths = [item.get("class_path") if isinstance(item, dict) else None for item in node]
        for index, item in enumerate(node):
            short = class_paths[index].rsplit(".", 1)[-1] if class_paths[index] else None
            unique = short is not None and sum(1 for c in class_paths if c and c.rsplit(".", 1)[-1] == short) == 1
            yield from _walk(item, prefix + [Selector(short) if unique else Index(index)])
    else:
        yield prefix, node
