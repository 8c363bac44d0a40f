"""Parameter-efficient fine-tuning update rules (imports torch and at most ``torchstep.ops`` / ``partition``; ``optim``
never imports it): DoRA with the factored norm (``DoRALinear``, ``patch_peft_dora`` for Hugging Face peft DoRA
layers), ALLoRA (reconstructed coefficient), LoRA-MGPO (official code), HUT and HFT (reconstructed).  Parameter groups
for peft models (LoRA+ etc.) are in :mod:`torchstep.integrations.peft`.  See docs/peft.md.
"""
from .allora import ALLoRA, allora_coefficient
from .dora import DoRALinear, PeftDoRAPatch, dora_scale, patch_peft_dora
from .hft import HalfFineTuning, default_category as hft_default_category
from .hut import HUTLinear, apply_hut, merge_hut
from .mgpo import MGPO, PROFILES as MGPO_PROFILES, find_lora_layers, mgpo_perturbation

__all__ = ["ALLoRA", "allora_coefficient", "DoRALinear", "PeftDoRAPatch", "dora_scale", "patch_peft_dora",
           "HalfFineTuning", "hft_default_category", "HUTLinear", "apply_hut", "merge_hut", "MGPO", "MGPO_PROFILES",
           "find_lora_layers", "mgpo_perturbation"]
