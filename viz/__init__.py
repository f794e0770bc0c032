"""Reading training logs and drawing the four plots (losses, rewards, timing, tokens)."""
