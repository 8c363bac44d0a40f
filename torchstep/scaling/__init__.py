"""Hyperparameter-scaling rules: Step Law, batch-size ↔ lr rules, ghost batch norm, weight decay across widths."""
from .batch import GhostBatchNorm, granziol_adam_sqrt, granziol_sgd_linear, hoffer_sqrt, regime_adaptation
from .step_law import StepLaw, step_law
from .weight_decay import top_singular_values, width_scaled_groups

__all__ = ["step_law", "StepLaw", "granziol_sgd_linear", "granziol_adam_sqrt", "hoffer_sqrt", "regime_adaptation",
           "GhostBatchNorm", "width_scaled_groups", "top_singular_values"]
