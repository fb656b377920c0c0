"""Running the workflow: the stage registry, the adapter every workflow script goes through, job
resources for local and SLURM runs, and per-job statistics."""
