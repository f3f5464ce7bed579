"""Replayable structural edits.

Every compression algorithm that changes a model's *structure* (removes channels, factorizes a
layer) returns a record: plain data that says what changed. Checkpoints store records; loading
replays them on a fresh architecture before the weights load, so a compressed checkpoint is
readable by any process, with or without the callback that made it.

A record kind is a dataclass subclass of `CompressionRecord` decorated with `@register_record`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, TypeVar

from torch import nn

R = TypeVar("R", bound=type["CompressionRecord"])

_RECORD_KINDS: dict[str, type[CompressionRecord]] = {}


@dataclasses.dataclass
class CompressionRecord:
    """Base of all structural edit records.

    Subclasses set `kind`, hold only JSON-able fields, and implement `apply`.
    """

    kind: ClassVar[str] = ""
    # Path of the submodule the edit applies to, relative to the module `replay` is given
    # ("" = that module itself; "model" for `ImageClassifier`). Keyword-only so subclasses can
    # declare fields without defaults.
    target: str = dataclasses.field(default="", kw_only=True)

    def apply(self, model: nn.Module) -> None:
        """Replays the edit on `model`: same shapes as the original edit, weights not required."""
        raise NotImplementedError

    def parameter_index_map(self) -> dict[str, dict[int, list[int]]]:
        """For each parameter (by name) whose shape shrank: dim -> kept indices.

        Lets optimizer state (momentum) follow surviving entries. Parameters not listed keep
        their state only if their name and shape are unchanged.
        """
        return {}

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CompressionRecord:
        """Rebuilds a record of any registered kind from `to_dict()` output.

        Raises:
            ValueError: for a missing or unknown kind.
        """
        kind = data.get("kind")
        if kind not in _RECORD_KINDS:
            raise ValueError(
                f"Compression record `kind` must be one of {sorted(_RECORD_KINDS)}, got {kind!r}. "
                "Is the module that defines it imported?"
            )
        record_cls = _RECORD_KINDS[kind]
        fields = {f.name for f in dataclasses.fields(record_cls)}
        return record_cls(**{k: v for k, v in data.items() if k in fields})


def register_record(record_cls: R) -> R:
    """Class decorator: makes `record_cls` loadable by `CompressionRecord.from_dict`."""
    if not record_cls.kind:
        raise ValueError(f"{record_cls.__name__} must set a non-empty class attribute `kind`.")
    existing = _RECORD_KINDS.get(record_cls.kind)
    if existing is not None and existing.__qualname__ != record_cls.__qualname__:
        raise ValueError(f"Record kind {record_cls.kind!r} is already taken by {existing.__name__}.")
    _RECORD_KINDS[record_cls.kind] = record_cls
    return record_cls


def as_record(record: CompressionRecord | Mapping[str, Any]) -> CompressionRecord:
    """Accepts a record or its dict form."""
    return record if isinstance(record, CompressionRecord) else CompressionRecord.from_dict(record)


def replay(model: nn.Module, records: Iterable[CompressionRecord | Mapping[str, Any]]) -> list[CompressionRecord]:
    """Applies `records` to `model` (each to its `target` submodule) in order.

    Returns the records as record objects.

    The one replay function: checkpoints, callbacks and the CLI all go through it. The built-in
    record kinds are registered: importing this module ran `compresslight.compression`'s
    `__init__` first, which imports every module that defines one.
    """
    applied = []
    for record in records:
        record = as_record(record)
        record.apply(model.get_submodule(record.target))
        applied.append(record)
    return applied
