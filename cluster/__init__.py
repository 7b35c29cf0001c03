"""Backends that turn a LaunchPlan into running processes (local, later Slurm and Ray)."""
