"""Running one stage: the LightningCLI that builds a stage from its config files and fits or tests it."""
