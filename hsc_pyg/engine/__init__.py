"""Everything around the model: training, evaluation protocols, scoring and its blocking, retrieval, checkpoints."""
