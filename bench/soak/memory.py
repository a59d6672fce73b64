"""Memory of the stack's long-lived processes over the soak, found by the titles Ray gives them.

Ray names an actor's worker process `ray::<Class>` (`ray::<Class>.<method>` while it runs a
method); a Serve replica's is `ray::ServeReplica:<app>:<deployment>`. Only descendants of the
`ray-vram up` process are looked at: other Ray clusters on the machine have the same titles.
Every router is a role of its own, named by its deployment (`router OpenAIRouter`,
`router OpenAIRouter-1`, …): each is its own process, and a leak shows in one.
"""

from __future__ import annotations

import re
import statistics
import threading
import time
from typing import Any

import psutil

from vram_scheduler.serving.router.router import ROUTER_APP, ROUTER_DEPLOYMENT

#: role -> title prefix.
ROLES = {
    "controller": "ray::ControllerActor",
}
#: A router's title (its deployment is `OpenAIRouter` or `OpenAIRouter-<n>`); its role is
#: ROUTER_ROLE + " " + the deployment.
ROUTER_TITLE = re.compile(rf"ray::ServeReplica:{re.escape(ROUTER_APP)}:({ROUTER_DEPLOYMENT}(?:-\d+)?)(?:\.|$)")
ROUTER_ROLE = "router"
UP_ROLE = "up"  # the `ray-vram up` process itself: the driver, the monitor, the controller API


def role_of(name: str) -> str | None:
    """The role of a process titled `name`, or None."""
    router = ROUTER_TITLE.match(name)
    if router:
        return f"{ROUTER_ROLE} {router.group(1)}"
    for role, prefix in ROLES.items():
        if name == prefix or name.startswith(prefix + "."):
            return role
    return None


def roles(samples: list[dict[str, Any]]) -> list[str]:
    """The roles to report: every router seen (or `router` alone when none was), then the others."""
    seen = {role for sample in samples for role in sample if role.startswith(ROUTER_ROLE + " ")}
    routers = sorted(seen, key=lambda role: (len(role), role))  # OpenAIRouter, -1, …, -9, -10
    return (routers or [ROUTER_ROLE]) + [*ROLES, UP_ROLE]


def title(process: psutil.Process) -> str:
    """What `ps` shows for the process: Ray writes its title over argv (padded with empty strings)."""
    return " ".join(process.cmdline()).strip()


def find(root: int) -> dict[str, list[psutil.Process]]:
    """The processes of each role among `root`'s descendants, and `root` itself as `up`."""
    found: dict[str, list[psutil.Process]] = {role: [] for role in ROLES}
    found[UP_ROLE] = [psutil.Process(root)]
    for process in psutil.Process(root).children(recursive=True):
        try:
            role = role_of(title(process))
        except psutil.Error:
            continue
        if role is not None:
            found.setdefault(role, []).append(process)
    return found


def measure(process: psutil.Process) -> dict[str, int]:
    """RSS, and USS (the process's own pages, what a leak grows) from one read of smaps."""
    info = process.memory_full_info()
    return {"rss": info.rss, "uss": info.uss}


class Sampler(threading.Thread):
    """Every `interval_s`: RSS and USS of each role's processes (summed per role, pids kept; each
    router is a role)."""

    def __init__(self, root: int, started: float, interval_s: float = 10.0):
        super().__init__(name="memory-sampler", daemon=True)
        self.root = root
        self.started = started
        self.interval_s = interval_s
        self.samples: list[dict[str, Any]] = []
        self.halt = threading.Event()

    def sample(self) -> dict[str, Any]:
        row: dict[str, Any] = {"t": round(time.monotonic() - self.started, 1)}
        for role, processes in find(self.root).items():
            rss = uss = 0
            pids = []
            for process in processes:
                try:
                    usage = measure(process)
                except psutil.Error:
                    continue
                rss, uss = rss + usage["rss"], uss + usage["uss"]
                pids.append(process.pid)
            if pids:
                row[role] = {"pids": pids, "rss": rss, "uss": uss}
        self.samples.append(row)
        return row

    def run(self) -> None:
        while True:
            self.sample()
            if self.halt.wait(self.interval_s):
                return


def summary(samples: list[dict[str, Any]], role: str) -> dict[str, Any]:
    """Start, end and max (MiB) of a role's RSS and USS, the pids seen, and the RSS trend."""
    rows = [(s["t"], s[role]) for s in samples if role in s]
    if not rows:
        return {"samples": 0}
    mib = 2**20
    rss = [r["rss"] / mib for _, r in rows]
    uss = [r["uss"] / mib for _, r in rows]
    out: dict[str, Any] = {
        "samples": len(rows),
        "pids": sorted({pid for _, r in rows for pid in r["pids"]}),
        "rss_start_mib": round(rss[0], 1),
        "rss_end_mib": round(rss[-1], 1),
        "rss_max_mib": round(max(rss), 1),
        "uss_start_mib": round(uss[0], 1),
        "uss_end_mib": round(uss[-1], 1),
        "uss_max_mib": round(max(uss), 1),
    }
    times = [t for t, _ in rows]
    if len(rows) >= 3 and len(set(times)) > 1:
        slope = statistics.linear_regression(times, rss).slope
        out["rss_trend_mib_per_min"] = round(slope * 60, 2)
    return out
