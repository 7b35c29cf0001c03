"""dlaunch: one YAML recipe to a distributed DeepSpeed or Accelerate training run."""

__version__ = "0.1.0"
