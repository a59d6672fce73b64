"""Hold an isolated Ray head with its dashboard on 127.0.0.1 until stdin closes (for the Jobs API test).

Usage: python ray_head.py DASHBOARD_PORT AGENT_PORT  — prints "ready" once the head is up.
`ray.cluster_utils.Cluster` because it takes the dashboard agent's port (its default, 52365, may
belong to another Ray cluster on the same machine) and never joins an existing cluster.
"""

import sys
import time

import httpx
from ray.cluster_utils import Cluster

dashboard_port, agent_port = int(sys.argv[1]), int(sys.argv[2])
cluster = Cluster(
    initialize_head=True,
    head_node_args={
        "num_cpus": 1,
        "include_dashboard": True,
        "dashboard_host": "127.0.0.1",
        "dashboard_port": dashboard_port,
        "dashboard_agent_listen_port": agent_port,
    },
)
deadline = time.monotonic() + 120
while time.monotonic() < deadline:  # any answer (401 included: token auth) means the dashboard is up
    try:
        httpx.get(f"http://127.0.0.1:{dashboard_port}/api/version", timeout=2)
        break
    except httpx.HTTPError:
        time.sleep(0.5)
print("ready", cluster.address, flush=True)
sys.stdin.read()
cluster.shutdown()
