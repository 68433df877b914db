"""Training on a token budget: train_model, packing, schedules and budget branches, checkpoints, sharding, recovery, pretraining."""
