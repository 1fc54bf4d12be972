"""Post-fine-tuning repair math beside Antidote's pruning: pure tensor functions, one module per family."""
