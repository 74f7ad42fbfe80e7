"""Pipeline stages. Importing them sets the loopback environment first (cluster.local.loopback_env)."""

import cluster  # noqa: F401  (its import keeps Ray on 127.0.0.1 unless RAY_ADDRESS names a cluster)
