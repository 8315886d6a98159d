"""tunelab: fine-tune language models on your own data (LoRA, DoRA, QLoRA, full)."""

__version__ = "0.1.0"
