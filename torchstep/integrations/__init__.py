"""Adapters for trainers: Hugging Face (``hf``), timm (``timm``).  Lightning needs none."""
