"""Training diagnostics built on the optimizers (``optim`` ← ``diagnostics`` ← ``bench``).

Every live diagnostic is a :class:`~torchstep.diagnostics.monitor.Monitor` (model, ``loss_fn(outputs, targets)``,
batch; measured every k steps), run from any loop by :class:`torchstep.integrations.monitors.MonitorSet`.
"""
from .alignment import DomainAlignment, domain_alignment
from .continual import (average_accuracy, min_acc, min_acc_per_task, wc_acc, windowed_forgetting,
                        windowed_forgetting_per_task, windowed_plasticity, windowed_plasticity_per_task)
from .data import data_scores, el2n_scores, grand_scores, prune_by_score, trained_runs
from .ghosts import (RhoController, SafeRadius, SafeRadiusMonitor, SafeStep, binary_radius, logit_gap_radius,
                     logit_slopes, predict_update, radius_along, safe_lr, safe_radius, slope_spread, top2_radius)
from .hessian import (BulkOutliers, CurvatureOperator, EigenResult, Operator, SpectralDensity, TraceEstimate,
                      as_operator, bulk_outliers, ggn_vector_product, hessian_vector_product, hutchinson_trace,
                      lanczos_eigenvalues, plot_spectral_density, power_eigenvalues, spectral_density,
                      student_t_quantile)
from .monitor import LossFn, Monitor
from .proxies import AttentionLogitMonitor, OutputLogitMonitor, gpt_attention_sites, lr_sensitivity, z_loss
from .representation import (matrix_entropy, matrix_nuclear_norm, matrix_nuclear_norm_exact, mnn_dataset_score,
                             normalize_representation)
from .stability import (SGDStability, SharpnessMonitor, adam_threshold, batch_sharpness, detect_rule, gd_threshold,
                        heavy_ball_threshold, nesterov_threshold, optimizer_thresholds, sgd_critical_lr,
                        sgd_linear_stability)
from .subspace import PROJECTIONS, IntrinsicDimension, Subspace, intrinsic_dimension, subspace_train_fn, train_in_subspace
from .updates import UpdateRank, UpdateSparsity, parameter_delta, update_rank, update_sparsity

__all__ = ["Monitor", "LossFn", "BulkOutliers", "CurvatureOperator", "EigenResult", "Operator", "SpectralDensity",
           "TraceEstimate", "as_operator", "bulk_outliers", "ggn_vector_product", "hessian_vector_product",
           "hutchinson_trace", "lanczos_eigenvalues", "plot_spectral_density", "power_eigenvalues",
           "spectral_density", "student_t_quantile", "SGDStability", "SharpnessMonitor", "adam_threshold",
           "batch_sharpness", "detect_rule", "gd_threshold", "heavy_ball_threshold", "nesterov_threshold",
           "optimizer_thresholds", "sgd_critical_lr", "sgd_linear_stability", "DomainAlignment", "domain_alignment", "average_accuracy", "min_acc",
           "min_acc_per_task", "wc_acc", "windowed_forgetting", "windowed_forgetting_per_task", "windowed_plasticity",
           "windowed_plasticity_per_task", "data_scores", "el2n_scores", "grand_scores", "prune_by_score",
           "trained_runs", "RhoController", "SafeRadius", "SafeRadiusMonitor", "SafeStep", "binary_radius",
           "logit_gap_radius", "logit_slopes", "predict_update", "radius_along", "safe_lr", "safe_radius",
           "slope_spread", "top2_radius", "AttentionLogitMonitor", "OutputLogitMonitor", "gpt_attention_sites",
           "lr_sensitivity", "z_loss", "matrix_entropy", "matrix_nuclear_norm", "matrix_nuclear_norm_exact",
           "mnn_dataset_score", "normalize_representation", "PROJECTIONS", "IntrinsicDimension", "Subspace",
           "intrinsic_dimension", "subspace_train_fn", "train_in_subspace", "UpdateRank", "UpdateSparsity",
           "parameter_delta", "update_rank", "update_sparsity"]
