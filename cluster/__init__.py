"""Cluster glue: DeepSpeed configs, local loopback Ray helpers, MLflow store defaults."""
