"""Post-training on the pretraining Trainer and the engine: supervised fine-tuning (sft.py), reinforcement learning
with verifiable rewards (rl/)."""
