"""Training: the planner (RunPlan), launching the child process, the shared loop, checkpoints, batches, losses,
the learning-rate search."""
