"""One honest base for optimizers that wrap another optimizer (SPECTRA now; projections, Schedule-Free,
Lookahead-style rules later).

:class:`OptimizerWrapper` is a real ``torch.optim.Optimizer`` built through torch's own ``__init__`` over the
base's parameter groups, then it **shares** the base's public ``param_groups`` list and ``state`` (schedulers,
checkpoints and ``add_param_group`` see one set of groups).  Step hooks registered on the wrapper run around
the wrapper's whole step (torch's own mechanism); state-dict hooks are registered on the base, whose
``state_dict``/``load_state_dict`` the wrapper delegates to (hooks receive the base optimizer).  No private
attribute of torch is read or aliased.
"""
from __future__ import annotations

from typing import Any, Callable

import torch


class OptimizerWrapper(torch.optim.Optimizer):
    """Base of wrappers: subclasses implement ``step`` and may call ``self.base.step()`` inside it.

    Args:
        base: the wrapped ``torch.optim.Optimizer`` (any: torch's or torchstep's).
    """

    def __init__(self, base: torch.optim.Optimizer) -> None:
        if not isinstance(base, torch.optim.Optimizer):
            raise TypeError(f"{type(self).__name__} wraps a torch.optim.Optimizer, got {type(base).__name__}")
        self.base = base
        super().__init__(base.param_groups, base.defaults)   # the same group dicts, not copies
        self._share()

    def _share(self) -> None:
        self.param_groups = self.base.param_groups
        self.state = self.base.state

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base!r})"

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if any(param_group is g for g in self.base.param_groups):   # torch's __init__ re-adding the base's groups
            return
        self.base.add_param_group(param_group)
        self.init_group(self.base.param_groups[-1])

    def init_group(self, group: dict[str, Any]) -> None:
        """Add the wrapper's own group keys (called for every group, also ones added later)."""

    def state_dict(self) -> dict[str, Any]:
        return self.base.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base.load_state_dict(state_dict)
        self._share()    # torch's load_state_dict replaces the group list and the state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none)

    def register_state_dict_pre_hook(self, hook: Callable, prepend: bool = False):
        return self.base.register_state_dict_pre_hook(hook, prepend)

    def register_state_dict_post_hook(self, hook: Callable, prepend: bool = False):
        return self.base.register_state_dict_post_hook(hook, prepend)

    def register_load_state_dict_pre_hook(self, hook: Callable, prepend: bool = False):
        return self.base.register_load_state_dict_pre_hook(hook, prepend)

    def register_load_state_dict_post_hook(self, hook: Callable, prepend: bool = False):
        return self.base.register_load_state_dict_post_hook(hook, prepend)
