"""What runs a model: the predictor, the checkpointer, the optimizer and learning-rate schedule,
and multi-process launch on CPUs and GPUs."""
