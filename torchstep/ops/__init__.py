"""Pure tensor math shared by several update rules (each written once)."""
from .spike import clip_spikes, clip_to_running_max
from .hessian import gnb_sampled_loss, hutchinson_diagonal

__all__ = ["clip_spikes", "clip_to_running_max", "gnb_sampled_loss", "hutchinson_diagonal"]
