"""Distributed pieces of torchstep: comm hooks, robust aggregation (imports torch and at most torchstep.ops /
torchstep.partition, never torchstep.optim)."""
from .robust import (AGGREGATORS, FlagInfo, LeastSquaresTask, ParameterServer, RobustHookState,  # noqa: F401
                     byzantine_gradients, coordinate_median, flag_aggregate, krum, krum_scores, mean_aggregate,
                     multi_krum, robust_aggregate, robust_comm_hook, simulate_parameter_server, trimmed_mean)
from .compression import (EF21Simulator, EF21State, RandK, TopK, compress, derive_seed, ef21_hook,  # noqa: F401
                          ef21_stepsize, ef21_theta_beta, ef21w_weights)
from .sketch import CountSketch, GaussianSketch, SketchState, sketch_hook  # noqa: F401
