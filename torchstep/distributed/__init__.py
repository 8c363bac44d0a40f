"""Distributed pieces of torchstep: comm hooks, robust aggregation (imports torch and at most torchstep.ops /
torchstep.partition, never torchstep.optim)."""
from .robust import (AGGREGATORS, FlagInfo, LeastSquaresTask, ParameterServer, RobustHookState,  # noqa: F401
                     byzantine_gradients, coordinate_median, flag_aggregate, krum, krum_scores, mean_aggregate,
                     multi_krum, robust_aggregate, robust_comm_hook, simulate_parameter_server, trimmed_mean)
