"""Post-training: supervised fine-tuning on chat data (sft.py), above the pretraining Trainer."""
