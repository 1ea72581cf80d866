"""The tied embedding/lm_head matrix in rows layout [vocab, hidden], for ONNX Runtime CPU sessions
of large batches: no prepacked second copy of the lm_head.

Artifacts hold the tied matrix once, as `lm_weight_t` [hidden, vocab]: the B operand of the lm_head
MatMul and the table of an embedding Gather on axis 1. A one-row step streams that layout fastest
(MLAS's M=1 kernel; Doge-20M's 32 MiB: 1.1 ms, against 1.7-1.9 ms for any product over
[vocab, hidden]). With M > 1 rows MLAS packs B on every call (batch 8: 5.2 ms) unless the session
prepacks it, which costs a second copy of the matrix (32 MiB for Doge-20M, 64 for Doge-60M). From
ROWS_MIN_BATCH rows on, W.h^T over the [vocab, hidden] rows (W the A operand, never packed) is as
fast as the prepacked product (batch 8: 1.80-2.10 against 1.80-2.02 ms; batch 2: 1.71 against
1.27, hence not below 8; one thread, side by side, 2026-12-02). So fp32 artifacts also carry the
graphs rewritten to read the matrix as an input ROWS (doge_export/lm_rows.py, manifest "lm_rows"),
and a runner for a batch that large holds the matrix only in rows layout, transposed from
weights.bin once, in chunks (read_rows).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

COLUMNS = "lm_weight_t"  # [hidden, vocab]: the artifact's layout
ROWS = "lm_weight"  # [vocab, hidden]: the input of the rows graphs
ROWS_MIN_BATCH = 8
_CHUNK = 16  # rows of lm_weight_t per read: 16 x 4 B, one cache line per row of the result


def rows_entry(manifest) -> dict | None:
    """The manifest's "lm_rows" entry (artifacts exported before it, quantized or half: None)."""
    entry = manifest.data.get("lm_rows")
    return entry if entry and any(t["name"] == COLUMNS for t in manifest.data["weights"]["tensors"]) else None


def read_rows(path: Path, entry: dict) -> np.ndarray:
    """The weights entry `entry` (lm_weight_t [hidden, vocab]) of the file at `path`, as a new
    [vocab, hidden] array; the process never holds the [hidden, vocab] copy (one chunk at a time)."""
    hidden, vocab = entry["shape"]
    rows = np.empty((vocab, hidden), np.float32)
    chunk = np.empty((_CHUNK, vocab), np.float32)
    with open(path, "rb", buffering=0) as f:
        f.seek(entry["offset"])
        for start in range(0, hidden, _CHUNK):
            part = chunk[: min(_CHUNK, hidden - start)]
            if f.readinto(memoryview(part).cast("B")) != part.nbytes:
                raise OSError(f"{path} ends inside {COLUMNS}")
            rows[:, start:start + len(part)] = part.T
    rows.flags.writeable = False
    return rows
