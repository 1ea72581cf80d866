"""Rounding helpers shared by the export wrappers (wrappers.py, mlp.py)."""

from __future__ import annotations

import torch


def in_fp32(fn, x: torch.Tensor) -> torch.Tensor:
    """fn(x) with one rounding to x's dtype, as PyTorch's CPU kernels do for fp16/bf16 inputs.

    fp32 graphs are traced exactly as before (no Cast nodes); half graphs get an fp32 island
    (Cast, fn, Cast), so the executor cannot compute fn in half precision with several roundings.
    """
    return fn(x) if x.dtype == torch.float32 else fn(x.float()).to(x.dtype)
