"""Training plumbing shared by teacher pretraining and distillation: checkpoints, EMA, optimisers, seeding."""
