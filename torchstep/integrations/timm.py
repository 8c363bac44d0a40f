"""Register torchstep optimizers in timm's optimizer registry.

``torchstep.integrations.timm.register()`` adds every registered method as
``torchstep-<name>`` (e.g. ``timm.optim.create_optimizer_v2(model, "torchstep-lion")``, or
``train.py --opt torchstep-lion``).  A hyphen, not an underscore: timm 1.0 parses ``a_b`` as
modifier ``a`` plus optimizer ``b`` (``opt.split('_')[-1]``), so ``"torchstep_lion"`` would
silently select timm's own Lion.  ``torchstep_<name>`` is registered too, for
``get_optimizer_info``/``list_optimizers`` look-ups, but cannot be selected by
``create_optimizer_v2``.
"""
from __future__ import annotations

import inspect

from ..registry import SPECS


def register(prefix: str = "torchstep") -> list[str]:
    """Register every torchstep optimizer with timm; returns the names registered."""
    from timm.optim import OptimInfo
    from timm.optim._optim_factory import default_registry

    names = []
    for spec in SPECS.values():
        params = inspect.signature(spec.cls).parameters
        betas = params["betas"].default if "betas" in params else None
        info_kwargs = dict(opt_class=spec.cls, description=f"torchstep {spec.cls.__name__} (arXiv {spec.arxiv})",
                           has_eps="eps" in params, has_momentum="momentum" in params,
                           has_betas=betas is not None, num_betas=len(betas) if betas else 2,
                           second_order=spec.family == "second-order")
        for sep in ("-", "_"):
            name = f"{prefix}{sep}{spec.name}"
            default_registry.register(OptimInfo(name=name, **info_kwargs))
            names.append(name)
    return names
