"""Training: the loop, run configs, checkpoints, schedules, fast paths, plots and distributed setup."""
