"""Group Relative Policy Optimization in plain PyTorch: rollouts, advantages, clipped loss, KL."""
