"""The cluster's Ray names, shared by every part: the namespace, the named actors and the node labels.

A client finds the allocator and the controller by these names (`ray.get_actor(name,
namespace=NAMESPACE)`) without importing the server code that defines them; `node-start` sets the
labels that the serving placement and the stress check read.
"""

from __future__ import annotations

NAMESPACE = "ray-vram"
#: The allocator: a named, detached actor that owns the VRAM ledger.
ALLOCATOR_ACTOR = "vram_allocator"
#: The cluster's one serving controller: a named, detached actor.
CONTROLLER_ACTOR = "ray-vram-controller"

#: Prefix of the node labels ray-vram sets (Ray reserves `ray.io/`).
LABEL_PREFIX = "ray-vram.io/"
#: The Ray node label naming the Kubernetes node (what the monitor calls the node in its inventory).
NODE_NAME_LABEL = f"{LABEL_PREFIX}node-name"
#: Node label (value "true") of the Ray nodes whose pods an endpoint Service reaches (the chart
#: sets it on the head and CPU worker pods): with `router_placement: spread`, the routers go only
#: there, at least one on each.
ROUTER_HOST_LABEL = f"{LABEL_PREFIX}router-host"
