"""Start one more Ray node on this machine, joined to a loopback head: `python -m cluster.node --address
127.0.0.1:PORT [--num-cpus N] [--resources JSON] --temp-dir DIR [--dashboard-agent-listen-port P]`.

What `ray start --address` does for a worker node once its checks pass, and what Ray's own
`ray.cluster_utils.Cluster.add_node` does: `ray._private.node.Node(RayParams(...), head=False)`, the node's
daemons (raylet, agents) left running when this process exits. `ray start` itself cannot do it on
loopback: with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 it refuses any non-head node ("Multi-node Ray
clusters are not supported on Windows and OSX"), and with 1 it rewrites every 127.0.0.1, the head's
address and --node-ip-address alike, to the machine's outward address (measured: it looked for the GCS
at that address for 90 s). Here the variable stays 0 (importing `cluster` sets it), so the node and
everything it contacts stay on 127.0.0.1. Used by `cluster.head.start_worker_node`.
"""

from __future__ import annotations

import argparse
import json

from cluster.local import LOOPBACK


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.node", description=__doc__.split("\n\n")[0])
    p.add_argument("--address", required=True, help="the head's GCS address, 127.0.0.1:PORT")
    p.add_argument("--num-cpus", type=int, default=1)
    p.add_argument("--resources", default="{}", help="custom resources as JSON, e.g. '{\"node2\": 1}'")
    p.add_argument("--temp-dir", required=True, help="this node's own temp dir (short: unix socket paths)")
    p.add_argument("--dashboard-agent-listen-port", type=int, default=None)
    args = p.parse_args(argv)
    host = args.address.rsplit(":", 1)[0]
    if host != LOOPBACK:
        raise SystemExit(f"--address {args.address}: only a head on {LOOPBACK} is joined here")

    from ray._private.node import Node
    from ray._private.parameter import RayParams

    try:  # as `ray start` does: a head with token authentication needs this node to load the token
        from ray._private.authentication.authentication_token_setup import ensure_token_if_auth_enabled

        ensure_token_if_auth_enabled(None, create_token_if_missing=False)
    except ImportError:
        pass
    params = RayParams(gcs_address=args.address, node_ip_address=LOOPBACK, node_name=LOOPBACK,
                       num_cpus=args.num_cpus, num_gpus=0, resources=json.loads(args.resources),
                       temp_dir=args.temp_dir, include_log_monitor=True, node_manager_port=0,
                       dashboard_agent_listen_port=args.dashboard_agent_listen_port, min_worker_port=0,
                       max_worker_port=0)
    node = Node(params, head=False, shutdown_at_exit=False, spawn_reaper=False)
    print(f"node {node.unique_id} started on {LOOPBACK}, joined to {args.address}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
