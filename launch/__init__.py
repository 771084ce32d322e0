"""Launching training: one node with torchrun (launch.local); SLURM comes next."""
