"""Shared problems and utilities for the test-suite."""
from __future__ import annotations

import copy
import io

import torch

import torchstep
from fixtures import FIXTURES as SPECS


def all_configs(include=lambda spec, desc: True):
    """(spec, kwargs, id) for every registered optimizer and every valid configuration."""
    out = []
    for spec in SPECS.values():
        for kwargs, desc in spec.configs:
            if include(spec, desc):
                out.append((spec, {**spec.base_kwargs, **kwargs}, f"{spec.name}-{desc}"))
    return out


def make_params(dtype=torch.float32, seed=0):
    """A 2-D matrix, a bias, a 0-dim scalar and a non-contiguous matrix (leaf views)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 3, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    b = torch.randn(4, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    s = torch.randn((), generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    nc = torch.randn(5, 6, generator=g, dtype=torch.float64).to(dtype).t().requires_grad_()
    assert not nc.is_contiguous() and nc.is_leaf
    return [w, b, s, nc]


def toy_loss(params, step=0):
    """A smooth loss whose gradient changes from step to step (data sampled by ``step``)."""
    g = torch.Generator().manual_seed(1000 + step)
    total = 0.0
    for p in params:
        x = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
        total = total + ((p - x) ** 2).sum() + (p * x).sin().sum()
    return total


def run_steps(opt, params, steps, start=0):
    for k in range(start, start + steps):
        opt.zero_grad(set_to_none=True)
        toy_loss(params, k).backward()
        opt.step()


def length_mask(lengths, T, dtype=torch.float64):
    """``(len(lengths), T)`` padding mask: row i has ``lengths[i]`` leading ones."""
    return (torch.arange(T) < torch.tensor(lengths).unsqueeze(1)).to(dtype)


def clone_params(params):
    return [p.detach().clone().requires_grad_() for p in params]


def roundtrip(state_dict):
    """Serialise and load back with ``weights_only=True`` (no pickled Python objects allowed)."""
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def assert_state_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if torch.is_tensor(a[k]):
            assert a[k].dtype == b[k].dtype, k
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def build(spec, params, **kwargs):
    return spec.cls(params, **kwargs)


__all__ = ["all_configs", "make_params", "toy_loss", "run_steps", "clone_params", "roundtrip",
           "assert_state_equal", "build", "copy", "torchstep"]
