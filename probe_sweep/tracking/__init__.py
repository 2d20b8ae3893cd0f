"""The tracker: a finished job, read back from its files, as one Weights & Biases run."""
