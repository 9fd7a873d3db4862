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


# Ray Data settings for the job's processes (a user's own environment wins). Ray Data's own cluster
# autoscaler asks the autoscaler (request_resources) for up to twice the CPUs its work runs on now; on
# the fake cluster of tests/test_autoscaler.py it asked for 30 CPUs while a trial decoded its split and
# so launched two gpu_1x and a gpu_4x node. raypipe's data tasks run on the nodes training brings up:
# Ray Data may use the cluster as it is, never grow it. (Parquet splits are read by raypipe's own
# tasks, data.decode_split: read_parquet's footer actors and sampling tasks take a whole CPU each.)
DATA_ENV = {"RAY_DATA_DEFAULT_CLUSTER_SCALING_UP_MAX_CPU_RESOURCE_DELTA": "0",
            "RAY_DATA_DEFAULT_CLUSTER_SCALING_UP_MAX_GPU_RESOURCE_DELTA": "0"}

CLUSTER_CONFIG_ENV = "RAYPIPE_CLUSTER_CONFIG"
DRIVER_RESOURCE = "raypipe_driver"   # the custom resource of the node type that hosts trial drivers (the head)


def launcher_config(path: str | None = None) -> tuple[dict, str] | None:
    """The cluster launcher's config that ``ray up`` leaves on the head (``~/ray_bootstrap_config.yaml``;
    or $RAYPIPE_CLUSTER_CONFIG) and its path; None when there is no such file."""
    import yaml

    path = Path(path or os.environ.get(CLUSTER_CONFIG_ENV) or Path.home() / "ray_bootstrap_config.yaml")
    return (yaml.safe_load(path.read_text()), str(path)) if path.is_file() else None


def worker_types(cluster: dict) -> list[tuple[str, dict]]:
    """The worker node types (name, type) of a launcher config, GPU types first."""
    types = cluster.get("available_node_types") or {}
    return sorted(((name, t) for name, t in types.items() if name != cluster.get("head_node_type")),
                  key=lambda item: -item[1].get("resources", {}).get("GPU", 0))


def autoscaler_capacity(path: str | None = None) -> dict | None:
    """The resources an autoscaling cluster can grow to, from the launcher's config: the head plus
    each worker type at its ``max_workers``, at most the global ``max_workers`` nodes in all, GPU
    types first. None when there is no such file."""
    found = launcher_config(path)
    if found is None:
        return None
    cluster = found[0]
    head = (cluster.get("available_node_types") or {}).get(cluster.get("head_node_type"), {})
    total = {k: float(v) for k, v in head.get("resources", {}).items()}
    nodes_left = cluster.get("max_workers", 0)
    for _, t in worker_types(cluster):
        n = min(t.get("max_workers", 0), nodes_left)
        nodes_left -= n
        for k, v in t.get("resources", {}).items():
            total[k] = total.get(k, 0.0) + n * v
    return total


def _fits(bundle: dict, resources: dict) -> int:
    """How many ``bundle``s one node with ``resources`` holds."""
    return int(min((resources.get(k, 0) + 1e-9) // v for k, v in bundle.items() if v > 0))


def check_node_types(cfg, concurrency: int, cluster: dict, source: str) -> None:
    """Before any resource is asked for: every bundle the main job will ask for (a trial's driver,
    its Train workers, a Ray Data task) fits some node type the autoscaler can launch, and
    ``concurrency`` trials' workers fit in the nodes ``max_workers`` allows. Otherwise the job would
    wait forever; this says which key to change instead."""
    types = cluster.get("available_node_types") or {}
    res = cfg.resources
    use_gpu = res.use_gpu if res.use_gpu != "auto" else any(t.get("resources", {}).get("GPU", 0) for t in types.values())
    driver = {"CPU": cfg.tune.driver_cpus}
    if any(t.get("resources", {}).get(DRIVER_RESOURCE, 0) for t in types.values()):
        driver[DRIVER_RESOURCE] = 0.001
    worker = {"CPU": res.cpus_per_worker, **({"GPU": res.gpus_per_worker} if use_gpu else {})}
    bundles = [("a trial's driver", driver, "tune.driver_cpus"), ("a Ray Data task", {"CPU": cfg.data.cpus_per_task},
                                                                  "data.cpus_per_task")]
    if res.num_workers:
        bundles.append(("a Train worker", worker, "resources.cpus_per_worker / resources.gpus_per_worker"))
    have = "; ".join(f"{name}: {t.get('resources', {})}" for name, t in types.items())
    for what, bundle, key in bundles:
        if not any(_fits(bundle, t.get("resources", {})) for t in types.values()):
            raise ConfigError(f"{what} asks for {bundle}, which no node type of {source} can hold ({have}): "
                              f"lower {key}, or add a node type that holds it")
    if res.num_workers:
        nodes_left, room = cluster.get("max_workers", 0), 0
        for _, t in worker_types(cluster):
            n = min(t.get("max_workers", 0), nodes_left)
            nodes_left -= n
            room += n * _fits(worker, t.get("resources", {}))
        head = types.get(cluster.get("head_node_type"), {})
        room += _fits(worker, head.get("resources", {}))
        if concurrency * res.num_workers > room:
            raise ConfigError(f"{concurrency} trials at a time x resources.num_workers={res.num_workers} Train workers "
                              f"need {concurrency * res.num_workers} places of {worker}; the node types of {source} "
                              f"hold at most {room} within max_workers={cluster.get('max_workers', 0)}: lower "
                              f"tune.max_concurrent_trials (--max-concurrent-trials) or raise max_workers")


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


def pin_data_stats_here() -> None:
    """Ray Data keeps one stats actor per cluster, detached, on the node of the process that first
    uses Ray Data. Created from a Train worker it lived on a GPU node, which then never went idle and
    was never terminated (tests/test_autoscaler.py). The driver creates it first, so it lives on the
    driver's node (the head). Ray's private API, pinned with Ray; without it nothing changes."""
    try:
        from ray.data._internal.stats import get_or_create_stats_actor
        get_or_create_stats_actor()
    except Exception:   # a Ray without it, or Ray Client
        pass


def ensure_ray(**init_kwargs) -> None:
    """Connect to the cluster named by RAY_ADDRESS (``ray submit``/``ray job``) or start a local one.

    Unless verbose (``--verbose``): Ray's logs show from WARNING up in the driver and from ERROR up
    in the job's workers and Train (their warnings are about Ray's own internals, e.g. the expected
    shutdown traceback of an early-stopped trial), Ray Data's from ERROR up. Train's print patch is
    off everywhere: it logs every ``print`` of a worker AND prints it, so each line appeared twice.
    """
    import logging

    import ray

    for k, v in {**QUIET_ENV, **DATA_ENV}.items():
        os.environ.setdefault(k, v)
    if not ray.is_initialized():
        runtime_env = dict(init_kwargs.pop("runtime_env", None) or {})
        job_env = {**{k: os.environ[k] for k in (*QUIET_ENV, *DATA_ENV)}, "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                   VERBOSE_ENV: "1" if verbose() else "0", **{k: os.environ[k] for k in STORAGE_ENV if k in os.environ}}
        if not verbose():
            job_env.setdefault("RAY_DATA_LOG_LEVEL", os.environ.get("RAY_DATA_LOG_LEVEL", "ERROR"))
            job_env["PYTHONWARNINGS"] = ",".join([*filter(None, [os.environ.get("PYTHONWARNINGS")]),
                                                  *(f"ignore:{m}" for m in RAY_INTERNAL_WARNINGS)])
        if "address" not in init_kwargs and not os.environ.get("RAY_ADDRESS"):
            job_env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"  # one local node: nothing to preempt
        # No worker_process_setup_hook here: with one, Ray Data's task workers are not reused and a
        # phase-1 epoch ran about 3x slower (docs/benchmarks.md, section 4).
        runtime_env["env_vars"] = {**job_env, **runtime_env.get("env_vars", {})}
        if not verbose():
            init_kwargs.setdefault("logging_config", ray.LoggingConfig(log_level="ERROR"))  # the job's workers
            init_kwargs.setdefault("logging_level", logging.WARNING)
        os.environ.update(job_env)  # a local cluster's raylet and workers inherit these too
        if not verbose():
            hide_ray_component_logs()
        ray.init(log_to_driver=True, runtime_env=runtime_env, **init_kwargs)
        pin_data_stats_here()
    quiet_ray_data()
    hide_internal_deprecations()
