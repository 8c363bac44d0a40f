"""torchstep: research-grade update rules for PyTorch, faithful to their papers, measured."""
from . import ops, optim, scaling, schedules
from .memory import state_bytes
from .partition import param_groups, routing_report
from .registry import OptimizerSpec, create, get_spec, list_optimizers

__version__ = "0.1.0"
__all__ = ["create", "list_optimizers", "get_spec", "OptimizerSpec", "param_groups", "routing_report", "state_bytes",
           "optim", "ops", "scaling", "schedules", "__version__"]
