"""medtune: fine-tune LLaMA-family models on medical data with LoRA and QLoRA."""

__version__ = "0.1.0"
