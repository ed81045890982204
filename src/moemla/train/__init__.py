"""Training: run settings, the loop, checkpoints and data parallelism."""
