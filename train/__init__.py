"""Training: the Hydra entry point, DeepSpeed engine, loop, checkpoints,
evaluation and tracking. `python -m train --help` lists the config groups."""
