"""Repairs applied to a model after (harmful) fine-tuning, as pure tensor functions."""
