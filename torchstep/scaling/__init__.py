"""Hyperparameter-scaling rules: Step Law, batch-size ↔ lr rules, ghost batch norm, weight decay across widths, μP,
AdAdaGrad's adaptive batch size."""
from .adaptive_batch import (AdaptiveBatch, AdaptiveBatchSampler, GradientStatistics, augmented_test,
                             gradient_statistics, inner_product_test, next_batch_size, norm_test,
                             orthogonality_test, per_sample_gradients, proposed_batch_size)
from .batch import GhostBatchNorm, granziol_adam_sqrt, granziol_sgd_linear, hoffer_sqrt, regime_adaptation
from .mup import (CoordRecord, MuReadout, MuShape, attention_scale, coord_check, coord_summary, dit_roles,
                  infinite_shapes, make_mup, mlp_coord_check, mu_shapes, mup_param_groups, plot_coord_check)
from .step_law import StepLaw, step_law
from .weight_decay import top_singular_values, width_scaled_groups

__all__ = ["step_law", "StepLaw", "granziol_sgd_linear", "granziol_adam_sqrt", "hoffer_sqrt", "regime_adaptation",
           "GhostBatchNorm", "width_scaled_groups", "top_singular_values", "MuShape", "infinite_shapes",
           "MuReadout", "attention_scale", "make_mup", "mu_shapes", "mup_param_groups", "dit_roles", "CoordRecord",
           "coord_check", "coord_summary", "plot_coord_check", "mlp_coord_check", "AdaptiveBatch", "AdaptiveBatchSampler",
           "GradientStatistics", "augmented_test", "gradient_statistics", "inner_product_test", "next_batch_size",
           "norm_test", "orthogonality_test", "per_sample_gradients", "proposed_batch_size"]
