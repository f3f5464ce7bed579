"""Progress bars for long work outside the training loop, and a quiet torch profiler.

`progress_bar` is every compresslight bar outside the Trainer (profiling, runtime models, LC
rank search, the sweep): it looks like Lightning's own `TQDMProgressBar` (tqdm, the same bar
format, on stdout unless told) and is off when its stream is not a terminal (logs, CI, pipes) or
when the caller says so (e.g. the Trainer's progress bar is disabled): then it is a no-op object
with the same methods.

`quiet_profiler_output` keeps the `STAGE:` / `USDT:` lines that the torch profiler's native
code (Kineto) prints on every start and stop away from the user: they are written to file
descriptor 2 from C++, below Python's `sys.stderr`, so the descriptor itself is redirected and
every other line is passed on afterwards.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import Any, TextIO

from tqdm import tqdm

# Lightning's TQDMProgressBar bar format (pytorch_lightning/callbacks/progress/tqdm_progress.py).
BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
PROFILER_NOISE = ("STAGE:", "USDT:")


def progress_enabled(enabled: bool | None = None, file: TextIO | None = None) -> bool:
    """Whether to draw bars: `enabled` if given (False wins), and only when `file` (stdout by
    default) is a terminal."""
    if enabled is False:
        return False
    stream = sys.stdout if file is None else file
    return bool(getattr(stream, "isatty", None) and stream.isatty())


class _NoBar:
    """The part of tqdm's interface compresslight uses, doing nothing."""

    n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        pass

    def set_description_str(self, text: str, refresh: bool = True) -> None:
        pass

    def reset(self, total: int | None = None) -> None:
        self.n = 0

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _NoBar:  # noqa: PYI034 - tqdm's own __enter__ is typed the same way
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_bar(
    total: int | None,
    desc: str,
    enabled: bool | None = None,
    leave: bool = False,
    file: TextIO | None = None,
    unit: str = "it",
) -> Any:
    """A tqdm bar in Lightning's style, or a no-op stand-in when bars are off.

    Args:
        total: steps expected (None: unknown).
        desc: the label left of the bar.
        enabled: False turns it off (e.g. `trainer.progress_bar_callback is None`); None: on
            when `file` is a terminal.
        leave: keep the finished bar on screen.
        file: where to draw it; stdout by default.
        unit: what a step is, for the rate ("trial").
    """
    stream = sys.stdout if file is None else file
    if not progress_enabled(enabled, stream):
        return _NoBar()
    return tqdm(
        total=total,
        desc=desc,
        leave=leave,
        dynamic_ncols=True,
        file=stream,
        smoothing=0,
        unit=unit,
        bar_format=BAR_FORMAT,
    )


@contextlib.contextmanager
def quiet_profiler_output() -> Iterator[None]:
    """Drops the torch profiler's `STAGE:`/`USDT:` lines from file descriptor 2; passes the rest on."""
    try:
        stderr_fd = sys.__stderr__.fileno() if sys.__stderr__ is not None else 2
        saved = os.dup(stderr_fd)
    except (OSError, ValueError, AttributeError):  # no real descriptor (e.g. a notebook): nothing to filter
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as captured:
        sys.stderr.flush()
        os.dup2(captured.fileno(), stderr_fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, stderr_fd)
            os.close(saved)
            captured.seek(0)
            kept = [
                line
                for line in captured.read().decode(errors="replace").splitlines(keepends=True)
                if not line.startswith(PROFILER_NOISE)
            ]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()
