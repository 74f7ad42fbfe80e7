"""Pipelines: Ray DAG wiring of the stages, Tune sweeps, the `pcpp` CLI and YAML configs."""
