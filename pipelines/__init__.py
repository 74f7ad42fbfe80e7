"""Pipelines: Ray DAG wiring of the stages, Tune sweeps, the `pcpp` CLI and YAML configs.

Importing this package sets the loopback environment before anything imports Ray (cluster.local).
"""

import cluster  # noqa: F401  (its import keeps Ray on 127.0.0.1 unless RAY_ADDRESS names a cluster)
