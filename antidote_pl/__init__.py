"""antidote_pl: repair LLMs after harmful fine-tuning (Antidote, arXiv 2408.09600) with PyTorch Lightning."""

__version__ = "0.1.0"
