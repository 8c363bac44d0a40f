"""``materialise``: store a small intermediate once inside a compiled graph instead of recomputing it."""
from __future__ import annotations

import torch
from torch import Tensor


def materialise(t: Tensor) -> Tensor:
    """``t`` itself; under ``torch.compile`` on CPU, a view that makes Inductor store ``t`` in a buffer first.

    Inductor inlines a pointwise expression into every loop that consumes it, so a per-row or per-tensor
    coefficient computed from reductions (a cosine, a norm ratio, a clip threshold) is recomputed — scalar
    ``sqrt`` and divisions included — for every vector of the parameter-sized update loop; its C++ is built
    with ``-fmath-errno``, so the compiler does not hoist them.  ``as_strided`` needs a storage, so Inductor
    realises its input: computed once, read as a number (measured by ``tools/compiled_reductions.py``:
    compiled SGDP 2.51 → 1.65× fused AdamW, AdamP 3.20 → 2.17×, Stable-SPAM 3.26 → 2.01×).  Values are
    unchanged.  On accelerators the expression stays inlined: recomputing it per element is free in a
    memory-bound GPU kernel, while a stored buffer may cost one more kernel launch (not measured here: no
    GPU was available).  Eagerly it is one ``is_compiling()`` check (the per-tensor eager step calls it)."""
    if torch.compiler.is_compiling() and t.device.type == "cpu":
        return t.as_strided(t.shape, t.stride())
    return t
