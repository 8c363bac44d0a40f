"""Learning-rate schedules: closed-form multipliers and the ``LRScheduler`` classes over them."""
from .functions import DECAY_SHAPES, constant, cosine, linear_decay, power, wsd
from .refined import GradNormRecorder, refined_schedule
from .schedulers import WSD, Constant, Cosine, LinearDecay, MultiplierLR, Power, Refined

__all__ = ["wsd", "power", "linear_decay", "cosine", "constant", "refined_schedule", "GradNormRecorder",
           "MultiplierLR", "WSD", "Power", "LinearDecay", "Cosine", "Constant", "Refined", "DECAY_SHAPES"]
