"""Pure-torch compression algorithms: each takes an `nn.Module` and returns a record; no Trainer."""

from compresslight.compression.record import CompressionRecord, register_record, replay

# Modules defining record kinds: importing them lets `CompressionRecord.from_dict` find them.
from compresslight.compression import depth, lowrank, pruning, quantization, tucker  # noqa: E402,F401  isort: skip

__all__ = ["CompressionRecord", "register_record", "replay"]
