"""Files that are whole or absent: a failed write (disk full, killed process) keeps the old file.

Every write goes to a temporary file in the target's own directory, is flushed and fsynced, and
then renamed over the target (`os.replace`, atomic on POSIX within one file system); a failure
removes the temporary file and leaves the target as it was.

Lightning's own `TorchCheckpointIO` (2.6) writes through an fsspec transaction whose temporary
file lives in the system temp dir and is *moved* into place: where that dir is another file system
(tmpfs `/tmp`, `/dev/shm`) the move is a copy, and a disk full during it leaves a truncated
checkpoint under its normal name; nothing is fsynced either. `AtomicCheckpointIO` replaces it for
local paths (the CLI installs it; pass `plugins=[AtomicCheckpointIO()]` to your own Trainer).
"""

from __future__ import annotations

import contextlib
import io
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch
from typing_extensions import override

from compresslight.lightning_compat import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO", "atomic_write", "atomic_write_text"]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """Opens a binary file whose content replaces `path` only once all of it is written and synced.

    Raises:
        OSError: from the write, the sync or the rename; `path` is then unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    # 0o666 through os.open: the umask applies, so the file gets the permissions a plain open gives.
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _fsync_directory(path.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """`Path.write_text`, atomically (see `atomic_write`)."""
    with atomic_write(path) as handle:
        handle.write(text.encode("utf-8"))


def _fsync_directory(directory: Path) -> None:
    """Makes the rename itself durable (a crash right after it could otherwise lose it)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. a platform that cannot open directories: the rename is done regardless
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's `TorchCheckpointIO`, but a local checkpoint is written with `atomic_write`.

    Remote paths (s3://, gs://, ...) go to Lightning's own writer, whose object stores replace
    objects whole.
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        # Serialized in memory first (as Lightning does): torch's zip writer would turn a failing
        # file write into an unrelated RuntimeError; this way a full disk raises its own OSError.
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        with atomic_write(path) as handle:
            handle.write(buffer.getbuffer())


def _is_local(path: Any) -> bool:
    return "://" not in str(path)
