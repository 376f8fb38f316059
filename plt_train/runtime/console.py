"""Console lines that ranks sharing one pipe cannot cut into each other.

``print`` writes a line and its newline in two ``write`` calls when the stream writes through
(stderr always; stdout under ``PYTHONUNBUFFERED``, which the tests and the GPU script set).
torchrun and srun hand every rank the same pipe, so rank 0's error line could end up in the
middle of the last rank's warning (CI, 2026-12-06).  One ``write`` of the whole line is one
``write(2)``, and a pipe never splits a write of up to ``PIPE_BUF`` (4 KiB on Linux) bytes.
"""
from __future__ import annotations

import sys
from typing import TextIO


def say(line: str, stream: TextIO | None = None) -> None:
    """Write ``line`` and its newline in one call, then flush (``stream``: stdout by default,
    looked up at the call so a redirected ``sys.stdout`` is honoured)."""
    stream = stream if stream is not None else sys.stdout
    stream.write(line + "\n")
    stream.flush()
