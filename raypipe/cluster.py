"""The Ray session on the driver: connecting (or starting a local cluster) with quiet logs, what
the cluster has or can grow to, and the preflight check before any data or trainer asks for it."""
from __future__ import annotations

import os
from pathlib import Path

from .console import (QUIET_ENV, RAY_INTERNAL_WARNINGS, VERBOSE_ENV, hide_internal_deprecations, hide_ray_component_logs,
                      quiet_ray_data, verbose)
from .errors import ConfigError
from .settings import ResourcesConfig

# Where S3-compatible storage is and its region: handed to the job's workers (credentials are not:
# nodes get them from their instance profile or their own environment).
STORAGE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


def resolve_use_gpu(res: ResourcesConfig) -> bool:
    """``auto``: GPUs when the cluster has (or, autoscaling, can launch) GPU nodes."""
    if res.use_gpu != "auto":
        return res.use_gpu
    return cluster_resources().get("GPU", 0) > 0


def cluster_resources() -> dict:
    """The cluster's resources; on an autoscaling cluster (RAYPIPE_AUTOSCALING=1) with the
    launcher's config on the head, what it can grow to (a cold cluster has no GPU node yet)."""
    import ray

    capacity = autoscaler_capacity() if os.environ.get("RAYPIPE_AUTOSCALING") == "1" else None
    return capacity or ray.cluster_resources()


CLUSTER_CONFIG_ENV = "RAYPIPE_CLUSTER_CONFIG"


def autoscaler_capacity(path: str | None = None) -> dict | None:
    """The resources an autoscaling cluster can grow to, read from the cluster launcher's config
    that ``ray up`` leaves on the head (``~/ray_bootstrap_config.yaml``; or $RAYPIPE_CLUSTER_CONFIG):
    the head plus each worker type at its ``max_workers``, at most the global ``max_workers``
    nodes in all, GPU types first. None when there is no such file."""
    import yaml

    path = Path(path or os.environ.get(CLUSTER_CONFIG_ENV) or Path.home() / "ray_bootstrap_config.yaml")
    if not path.is_file():
        return None
    cluster = yaml.safe_load(path.read_text())
    types = cluster.get("available_node_types") or {}
    head = types.get(cluster.get("head_node_type"), {})
    total = {k: float(v) for k, v in head.get("resources", {}).items()}
    nodes_left = cluster.get("max_workers", 0)
    workers = sorted((t for name, t in types.items() if name != cluster.get("head_node_type")),
                     key=lambda t: -t.get("resources", {}).get("GPU", 0))
    for t in workers:
        n = min(t.get("max_workers", 0), nodes_left)
        nodes_left -= n
        for k, v in t.get("resources", {}).items():
            total[k] = total.get(k, 0.0) + n * v
    return total


def check_cluster_can_fit(res: ResourcesConfig, use_gpu: bool) -> None:
    """Fail fast when no node set could ever host the workers (instead of waiting forever)."""
    import ray

    if res.num_workers == 0 or os.environ.get("RAYPIPE_AUTOSCALING") == "1":
        return
    total = ray.cluster_resources()
    need_cpu = res.num_workers * res.cpus_per_worker
    need_gpu = res.num_workers * res.gpus_per_worker if use_gpu else 0
    if need_cpu > total.get("CPU", 0) + 1e-6 or need_gpu > total.get("GPU", 0) + 1e-6:
        raise ConfigError(
            f"resources.num_workers={res.num_workers} x (CPU {res.cpus_per_worker}, GPU "
            f"{res.gpus_per_worker if use_gpu else 0}) needs CPU {need_cpu:g} / GPU {need_gpu:g}; the Ray "
            f"cluster has CPU {total.get('CPU', 0):g} / GPU {total.get('GPU', 0):g}. Lower "
            f"resources.num_workers or resources.cpus_per_worker (set RAYPIPE_AUTOSCALING=1 on an "
            f"autoscaling cluster)")


def preflight(res: ResourcesConfig) -> None:
    """Connect to Ray and check the workers can ever be placed: before data or trainers ask."""
    ensure_ray()
    check_cluster_can_fit(res, resolve_use_gpu(res))


def ensure_ray(**init_kwargs) -> None:
    """Connect to the cluster named by RAY_ADDRESS (``ray submit``/``ray job``) or start a local one.

    Unless verbose (``--verbose``): Ray's logs show from WARNING up in the driver and from ERROR up
    in the job's workers and Train (their warnings are about Ray's own internals, e.g. the expected
    shutdown traceback of an early-stopped trial), Ray Data's from ERROR up. Train's print patch is
    off everywhere: it logs every ``print`` of a worker AND prints it, so each line appeared twice.
    """
    import logging

    import ray

    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    if not ray.is_initialized():
        runtime_env = dict(init_kwargs.pop("runtime_env", None) or {})
        job_env = {**{k: os.environ[k] for k in QUIET_ENV}, "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                   VERBOSE_ENV: "1" if verbose() else "0", **{k: os.environ[k] for k in STORAGE_ENV if k in os.environ}}
        if not verbose():
            job_env.setdefault("RAY_DATA_LOG_LEVEL", os.environ.get("RAY_DATA_LOG_LEVEL", "ERROR"))
            job_env["PYTHONWARNINGS"] = ",".join([*filter(None, [os.environ.get("PYTHONWARNINGS")]),
                                                  *(f"ignore:{m}" for m in RAY_INTERNAL_WARNINGS)])
        if "address" not in init_kwargs and not os.environ.get("RAY_ADDRESS"):
            job_env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"  # one local node: nothing to preempt
        # No worker_process_setup_hook here: with one, Ray Data's task workers are not reused and a
        # phase-1 epoch ran 6x slower (docs/benchmarks.md).
        runtime_env["env_vars"] = {**job_env, **runtime_env.get("env_vars", {})}
        if not verbose():
            init_kwargs.setdefault("logging_config", ray.LoggingConfig(log_level="ERROR"))  # the job's workers
            init_kwargs.setdefault("logging_level", logging.WARNING)
        os.environ.update(job_env)  # a local cluster's raylet and workers inherit these too
        if not verbose():
            hide_ray_component_logs()
        ray.init(log_to_driver=True, runtime_env=runtime_env, **init_kwargs)
    quiet_ray_data()
    hide_internal_deprecations()
