"""Training: the LightningModule, the teacher DataModule and the LightningCLI glue (`qthink fit`)."""
