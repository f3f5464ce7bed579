"""A simple record kind for tests of the record mechanism itself (not a real algorithm)."""

import dataclasses

from torch import nn

from compresslight.compression.record import CompressionRecord, register_record


@register_record
@dataclasses.dataclass
class SplitLinearRecord(CompressionRecord):
    """Replaces Linear `layer` by two Linears through `width` hidden units."""

    kind = "test_split_linear"
    layer: str
    width: int

    def apply(self, model: nn.Module) -> None:
        parent_name, _, child = self.layer.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        setattr(
            parent,
            child,
            nn.Sequential(nn.Linear(old.in_features, self.width), nn.Linear(self.width, old.out_features)),
        )
