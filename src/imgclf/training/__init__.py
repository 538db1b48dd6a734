"""Training: the linear probe, fine-tuning and the run that ties them together."""
