"""Pure tensor math shared by several update rules (each written once)."""
from .spike import clip_spikes, clip_to_running_max
from .hessian import gnb_sampled_loss, hutchinson_diagonal
from .dora import (DoRAComposeFunction, dense_row_norm, dora_chunk_size, dora_compose, dora_compose_,
                   dora_compose_fused, factored_row_norm)

__all__ = ["clip_spikes", "clip_to_running_max", "gnb_sampled_loss", "hutchinson_diagonal", "DoRAComposeFunction",
           "dense_row_norm", "dora_chunk_size", "dora_compose", "dora_compose_", "dora_compose_fused",
           "factored_row_norm"]
