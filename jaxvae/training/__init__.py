"""A training run: its config, the train step and loop, validation, checkpoints."""
