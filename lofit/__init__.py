"""LoFiT: localized fine-tuning of attention-head representations (Yin, Ye & Durrett, 2024)."""

__version__ = "0.1.0"
