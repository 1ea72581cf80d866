"""Parity-test helpers: lock-step comparison (doge_export.lockstep) and prompt makers."""

from __future__ import annotations

import numpy as np

from doge_export.lockstep import first_mismatch, lockstep, tie_excuse  # noqa: F401


def varied_prompts(lengths, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, n).tolist() for n in lengths]
