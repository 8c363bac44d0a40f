"""``materialise``: store a small intermediate once inside a compiled graph instead of recomputing it."""
from __future__ import annotations

import torch
from torch import Tensor


def materialise(t: Tensor) -> Tensor:
    """``t`` itself; under ``torch.compile``, a view that makes Inductor store ``t`` in a buffer first.

    Inductor inlines a pointwise expression into every loop that consumes it, so a per-row or per-tensor
    coefficient computed from reductions (a cosine, a norm ratio, a clip threshold) is recomputed — scalar
    ``sqrt`` and divisions included — for every vector of the parameter-sized update loop; its C++ is built
    with ``-fmath-errno``, so the compiler does not hoist them.  ``as_strided`` needs a storage, so Inductor
    realises its input: computed once, read as a number (measured: compiled SGDP 2.68 → 1.80× fused AdamW,
    AdamP 3.32 → 2.20×, ``tools/compiled_reductions.py``).  Values are unchanged."""
    if torch.compiler.is_compiling():
        return t.as_strided(t.shape, t.stride())
    return t
