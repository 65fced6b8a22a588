"""Run as a script by test_ray_serve.py: join the server's Ray, kill one replica of the clipdeploy deployment,
wait until Ray Serve runs two replicas again without it, and print what happened as one JSON line.

A separate process: Ray's auth mode is read once per process, and this driver's Ray must not outlive it.
"""

from __future__ import annotations

import json
import sys
import time

import ray
from ray import serve

PREFIX = "SERVE_REPLICA::clipdeploy#clipdeploy#"


def replicas() -> dict[str, str]:
    named = ray.util.list_named_actors(all_namespaces=True)
    return {a["name"]: a["namespace"] for a in named if a["name"].startswith(PREFIX)}


def running() -> int:
    app = serve.status().applications.get("clipdeploy")
    return 0 if app is None else int(app.deployments["clipdeploy"].replica_states.get("RUNNING", 0))


def main(address: str, timeout: float) -> int:
    ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    try:
        before = replicas()
        out: dict = {"before": sorted(before), "running_before": running()}
        victim = sorted(before)[0]
        ray.kill(ray.get_actor(victim, namespace=before[victim]), no_restart=True)
        killed = time.monotonic()
        out["victim"] = victim
        while time.monotonic() - killed < timeout:
            now, up = replicas(), running()
            if victim not in now and len(now) == 2 and up == 2:
                out.update(after=sorted(now), running_after=up, recovered_s=round(time.monotonic() - killed, 2))
                break
            out.update(after=sorted(now), running_after=up)
            time.sleep(0.25)
        print(json.dumps(out), flush=True)
        return 0
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], float(sys.argv[2])))
