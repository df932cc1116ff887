"""Learning-rate schedules as a multiplier of the base lr: linear warmup, then cosine or WSD."""
import math


def lr_factor(step: int, max_steps: int, optim) -> float:
    """Multiplier for the update that takes the model from `step` to `step + 1`."""
    warmup = min(optim.warmup_steps, max_steps)
    floor = optim.min_lr_ratio
    if step < warmup:
        return (step + 1) / warmup
    if optim.schedule == "wsd":
        decay_steps = max(1, round(optim.decay_fraction * max_steps))
        decay_start = max(warmup, max_steps - decay_steps)
        if step < decay_start:
            return 1.0
        progress = (step - decay_start) / max(1, max_steps - decay_start)
        return 1.0 - (1.0 - floor) * min(progress, 1.0)
    progress = (step - warmup) / max(1, max_steps - warmup)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
