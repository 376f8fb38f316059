"""Read the history rows back from an offline ``run-*.wandb`` file.

Offline wandb writes no ``wandb-summary.json``, so tests read the record log itself: a 7-byte
header, then 32 KiB blocks of chunks, each with a little-endian (crc u32, length u16, type u8)
header; type FULL holds a whole record, FIRST/MIDDLE/LAST one split across blocks.  Block tails
shorter than a chunk header are zero padding.
"""
from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any, Dict, List

from wandb.proto import wandb_internal_pb2

_HEADER, _BLOCK, _CHUNK = 7, 32 * 1024, 7
_FULL, _LAST = 1, 4


def read_history(path: str | Path) -> List[Dict[str, Any]]:
    """Every ``history`` record as a dict ``{key: value}`` (including ``_step``), in order."""
    data = Path(path).read_bytes()
    pos, pending, rows = _HEADER, b"", []
    while pos + _CHUNK <= len(data):
        if _BLOCK - pos % _BLOCK < _CHUNK:  # padding at the end of a block
            pos += _BLOCK - pos % _BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + _CHUNK])
        pending += data[pos + _CHUNK:pos + _CHUNK + length]
        pos += _CHUNK + length
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.HasField("history"):
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def wait_for_history(path: str | Path, rows: int, timeout: float = 30.0) -> List[Dict[str, Any]]:
    """``read_history`` once at least ``rows`` rows are on disk.

    wandb's writer is a separate service process: ``run.finish()`` can return (seen on a loaded
    2-core machine) before its last records reach the file.  A row that never arrives still
    fails the caller's assertions after ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while True:
        got = read_history(path)
        if len(got) >= rows or time.monotonic() > deadline:
            return got
        time.sleep(0.2)
