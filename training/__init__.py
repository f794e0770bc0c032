"""What the two trainers (sft/, grpo/) share around their loops: the run's folder, log, evals,
checkpoints and final save (`training.run`)."""
