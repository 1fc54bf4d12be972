"""Models: loading causal LMs and adapters, and the SFT LightningModule."""
