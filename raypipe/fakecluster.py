"""cluster.yaml's node types on one machine, launched and terminated by Ray's own autoscaler: the
``fake_multinode`` provider, whose worker "nodes" are extra raylets here with their node type's
resources (GPUs are logical: Ray assigns them, torch sees none). For the tests and benchmarks of the
cluster path, and for trying a change to cluster.yaml before ``ray up``.

The provider's config is derived from the launcher config, never hand-copied: node types, their
resources (custom ones included), ``min_workers``/``max_workers`` and the cluster's ``max_workers``
come from it; only what one machine needs is scaled (CPU counts, the idle timeout). Token auth is on,
as cluster.yaml sets it. ``ray up``/``ray submit`` have no command runner for this provider: jobs go
through the Jobs API (``ray job submit`` / ``JobSubmissionClient``) to the head's dashboard.
"""
from __future__ import annotations

import ast
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

HEAD_TYPE = "ray.head.default"   # the provider's fixed name for the head's node type


def scaled_cpus(n: float, scale: float) -> int:
    """A node type's CPU count on this machine: ``scale`` of cluster.yaml's, at least 1."""
    return max(1, round(n * scale))


def derive(launcher: dict, cpu_scale: float = 0.125, idle_timeout_minutes: float = 0.2,
           head_cpu_scale: float | None = None) -> dict:
    """The fake provider's autoscaling config for ``launcher`` (a cluster.yaml as a dict); the head's
    CPUs scaled by ``head_cpu_scale`` (default: ``cpu_scale``), the worker types' by ``cpu_scale``."""
    types = launcher.get("available_node_types") or {}
    head_name = launcher.get("head_node_type")
    if head_name not in types:
        raise ValueError(f"head_node_type {head_name!r} is not one of available_node_types {sorted(types)}")

    def resources(t: dict, scale: float = cpu_scale) -> dict:
        r = dict(t.get("resources") or {})
        if "CPU" in r:
            r["CPU"] = scaled_cpus(r["CPU"], scale)
        return r

    head = resources(types[head_name], cpu_scale if head_cpu_scale is None else head_cpu_scale)
    nodes = {HEAD_TYPE: {"resources": head, "node_config": {}, "max_workers": 0}}
    for name, t in types.items():
        if name != head_name:
            nodes[name] = {"resources": resources(t), "node_config": {},
                           "min_workers": t.get("min_workers", 0), "max_workers": t.get("max_workers", 0)}
    return {
        "cluster_name": f"{launcher.get('cluster_name', 'raypipe')}-fake",
        "max_workers": launcher.get("max_workers", 0),
        "upscaling_speed": launcher.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "available_node_types": nodes,
        "head_node_type": HEAD_TYPE,
        "auth": {"ssh_user": "ubuntu"},
        "docker": {},
        **{key: [] for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                               "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")},
        "file_mounts": {},
        "cluster_synced_files": [],
    }


def head_resources(config: dict) -> dict:
    return config["available_node_types"][HEAD_TYPE]["resources"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_dir(dashboard: str, headers: dict | None = None) -> Path:
    """The session folder (logs, sockets) of the cluster whose dashboard is at ``dashboard``, named by
    the cluster itself (``/api/version``). Not ``session_latest``: Ray re-points that link for the
    newest head on the host, and never again once its target is gone (a dangling link is left as it
    is), so after someone removes old sessions it names a folder that no longer exists."""
    from urllib.request import Request, urlopen
    from ray._common.utils import get_default_ray_temp_dir
    with urlopen(Request(f"{dashboard}/api/version", headers=headers or {}), timeout=30) as reply:
        name = json.load(reply)["session_name"]
    return Path(get_default_ray_temp_dir(), name)


def _ray_bin() -> str:
    return shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"


class FakeCluster:
    """A running fake cluster: ``start()`` writes the config and the token under ``folder`` and runs
    ``ray start --head`` with the head type's resources; ``env`` is what a client needs (address,
    token); ``stop()`` ends every node. Use as a context manager."""

    def __init__(self, config: dict, folder: Path, env: dict | None = None, dashboard_port: int = 8265):
        self.config, self.folder = config, Path(folder)
        self.config_path = self.folder / "autoscaler.yaml"
        self.token_path = self.folder / "auth_token"
        self.address = f"http://127.0.0.1:{dashboard_port}"
        self.dashboard_port = dashboard_port
        self.extra_env = dict(env or {})

    @property
    def env(self) -> dict:
        """Environment of a client of this cluster (and of its nodes): token auth on, the token's file."""
        return {**os.environ, **self.extra_env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path),
                "RAY_ADDRESS": self.address}

    def start(self, timeout: float = 120) -> "FakeCluster":
        from ray._private.services import get_node_ip_address
        self.folder.mkdir(parents=True, exist_ok=True)
        port = free_port()   # the provider starts each node's raylet against the head's GCS at this address
        self.config["provider"]["gcs_address"] = f"{get_node_ip_address()}:{port}"
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.token_path.write_text(secrets.token_hex(32))
        self.token_path.chmod(0o600)
        head = head_resources(self.config)
        custom = {k: v for k, v in head.items() if k not in ("CPU", "GPU", "memory")}
        env = {**self.env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
        env.pop("RAY_ADDRESS")
        cmd = [_ray_bin(), "start", "--head", f"--port={port}", f"--dashboard-port={self.dashboard_port}",
               "--dashboard-host=127.0.0.1", f"--num-cpus={head.get('CPU', 0)}", f"--num-gpus={head.get('GPU', 0)}",
               f"--resources={json.dumps(custom)}", f"--autoscaling-config={self.config_path}"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"ray start failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        self.wait_for_dashboard(timeout)
        self.session_dir = session_dir(self.address, self.headers())
        return self

    def wait_for_dashboard(self, timeout: float) -> None:
        from ray.job_submission import JobSubmissionClient
        deadline = time.time() + timeout
        while True:
            try:
                JobSubmissionClient(self.address, headers=self.headers()).list_jobs()
                return
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(1)

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token_path.read_text().strip()}"}

    def client(self):
        from ray.job_submission import JobSubmissionClient
        return JobSubmissionClient(self.address, headers=self.headers())

    def state(self, resource: str, **filters) -> list[dict]:
        """Ray's state API on this cluster (``resource``: "nodes", "actors", ...), dead entries
        included, as dicts; ``filters`` are equality filters, e.g. ``class_name="RayTrainWorker"``."""
        from ray.util.state.common import ListApiOptions, StateResource
        from ray.util.state.api import StateApiClient
        client = StateApiClient(self.address, headers={**self.headers(), "Content-Type": "application/json"})
        options = ListApiOptions(limit=10_000, detail=True, filters=[(k, "=", v) for k, v in filters.items()])
        rows = client.list(StateResource(resource), options=options, raise_on_missing_output=False)
        return [r if isinstance(r, dict) else r.__dict__ for r in rows]

    def gpu_nodes(self, alive_only: bool = True) -> set[str]:
        """Ids of the worker nodes with GPUs (alive ones, or every one the autoscaler launched)."""
        return {n["node_id"] for n in self.state("nodes") if n["resources_total"].get("GPU", 0) > 0
                and (n["state"] == "ALIVE" or not alive_only)}

    def autoscaler_status(self) -> list[dict]:
        """The autoscaler's status at each of its updates so far, from its own log (the head's
        ``monitor.log``): see :func:`parse_autoscaler_status`."""
        return parse_autoscaler_status((self.session_dir / "logs" / "monitor.log").read_text(errors="replace"))

    def head_node(self) -> str:
        (head,) = [n["node_id"] for n in self.state("nodes") if n["is_head_node"]]
        return head

    def stop(self) -> None:
        subprocess.run([_ray_bin(), "stop", "--force"], env=self.env, capture_output=True, timeout=120)

    def __enter__(self) -> "FakeCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


_BUNDLE = re.compile(r"^\s*(\{.*?\})(?: \* (\d+) \(\w+\))?: (\d+)\+? (from request_resources|pending)")
_CPU_TOTAL = re.compile(r"^\s*[\d.e-]+/([\d.]+) CPU\b")


def parse_autoscaler_status(log: str) -> list[dict]:
    """Each status report in an autoscaler log (Ray 2.60's v1 autoscaler, as ``ray status`` prints
    it) as ``{"cpus": the cluster's CPUs, "requested": [(bundle, count)] from request_resources(),
    "pending": [(bundle, count)] of pending tasks, actors and placement groups}``. A placement
    group's line ``{...} * n (PACK): 1+ pending placement groups`` counts n bundles."""
    reports, section = [], None
    for line in log.splitlines():
        if "Autoscaler status:" in line:
            reports.append({"cpus": 0.0, "requested": [], "pending": []})
            section = None
        elif not reports:
            continue
        elif line.startswith("From request_resources:"):
            section = "requested"
        elif line.startswith("Pending Demands:"):
            section = "pending"
        elif (m := _CPU_TOTAL.match(line)) and section is None:
            reports[-1]["cpus"] = float(m.group(1))
        elif section and (m := _BUNDLE.match(line)):
            bundle = ast.literal_eval(m.group(1))
            reports[-1][section].append((bundle, int(m.group(2) or m.group(3))))
        elif not line.startswith(" "):
            section = None
    return reports
