"""Step Law: optimal lr and batch size from model size and data (Li et al., "Predictable Scale Part I",
arXiv 2503.04715; repo step-law/steplaw)."""
from __future__ import annotations

from typing import NamedTuple

CONSTANTS = {
    "paper": (1.79, -0.713, 0.307, 0.58, 0.571),
    # the repository's CLI (code/fit_tool.py pred-opt-lr-bs) uses the mean of its 1000 bootstrap fits
    "repo_mean": (1.7973, -0.71292, 0.30749, 0.58069, 0.57094),
}


class StepLaw(NamedTuple):
    lr: float
    batch_size: float        # tokens per step

    def batch_sequences(self, seq_len: int) -> float:
        """The batch size in sequences of ``seq_len`` tokens."""
        if seq_len < 1:
            raise ValueError(f"Invalid seq_len: {seq_len!r} (valid range: an int >= 1)")
        return self.batch_size / seq_len


def step_law(n_params: float, n_tokens: float, constants: str = "paper", embedding_params: float = 0.0) -> StepLaw:
    """``η* = 1.79·N^−0.713·D^0.307`` and ``B* = 0.58·D^0.571`` tokens (paper constants; ``repo_mean`` ≈ 2 % apart).

    Args:
        n_params: N, **non-embedding** parameters (pass the total and ``embedding_params`` to subtract them).
        n_tokens: D, training tokens.
        constants: ``paper`` (default) or ``repo_mean``.
        embedding_params: embedding parameters included in ``n_params``, subtracted first.
    Returns a ``StepLaw(lr, batch_size)`` (a tuple; ``batch_size`` in tokens, ``.batch_sequences(seq_len)``).
    """
    if constants not in CONSTANTS:
        raise ValueError(f"Invalid constants: {constants!r} (valid range: one of {tuple(CONSTANTS)})")
    n = n_params - embedding_params
    if not n > 0:
        raise ValueError(f"Invalid n_params: {n_params!r} (valid range: > embedding_params = {embedding_params})")
    if not n_tokens > 0:
        raise ValueError(f"Invalid n_tokens: {n_tokens!r} (valid range: (0, inf))")
    a, alpha, beta, b, gamma = CONSTANTS[constants]
    return StepLaw(a * n ** alpha * n_tokens ** beta, b * n_tokens ** gamma)


__all__ = ["step_law", "StepLaw", "CONSTANTS"]
