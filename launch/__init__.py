"""Launching training: one node with torchrun (launch.local), SLURM jobs with
preemption and requeue (launch.slurm)."""
