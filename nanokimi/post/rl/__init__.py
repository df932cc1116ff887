"""Reinforcement learning with verifiable rewards (Kimi k1.5 policy mirror descent, GRPO family): `nanokimi rl`."""
