"""Post-training: supervised fine-tuning and reinforcement learning."""
