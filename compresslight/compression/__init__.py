"""Pure-torch compression algorithms: each takes an `nn.Module` and returns a record; no Trainer."""

from compresslight.compression.record import CompressionRecord, register_record, replay

__all__ = ["CompressionRecord", "register_record", "replay"]
