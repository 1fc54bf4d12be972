"""Lightning training glue: the SFT LightningModule of every stage and the DataModules that feed it."""
