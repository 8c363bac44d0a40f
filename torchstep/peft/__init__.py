"""Parameter-efficient fine-tuning update rules (ALLoRA, LoRA-MGPO, HUT, HFT, DoRA helpers)."""
