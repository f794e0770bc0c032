"""Rollout throughput and GRPO step cost, ours against `transformers` generate."""
