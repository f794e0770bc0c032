"""Supervised LoRA fine-tuning that teaches the `#### N` answer format and when to stop."""
