"""Cluster glue: DeepSpeed configs, local loopback Ray helpers, MLflow store defaults.

Importing this package sets the loopback environment before anything can import Ray (cluster.local).
"""

from cluster.local import loopback_env as _loopback_env

_loopback_env()
