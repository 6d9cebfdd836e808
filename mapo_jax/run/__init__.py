"""A run's housekeeping: checkpoints, the workdir (lock, configs), divergence guards and metrics."""
