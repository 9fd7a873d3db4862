"""The Ray session on the driver: connecting (or starting a local cluster) with quiet logs, what
the cluster has or can grow to, and the preflight check before any data or trainer asks for it."""
from __future__ import annotations

import os
import re
from pathlib import Path

from .config import VERBOSE_ENV, Config, ConfigError, ResourcesConfig, verbose

def resolve_use_gpu(res: ResourcesConfig) -> bool:
    """``auto``: GPUs when the cluster has (or, autoscaling, can launch) GPU nodes."""
    if res.use_gpu != "auto":
        return res.use_gpu == "true"
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


def preflight(cfg: Config) -> None:
    """Connect to Ray and check the workers can ever be placed: before data or trainers ask."""
    ensure_ray()
    check_cluster_can_fit(cfg.resources, resolve_use_gpu(cfg.resources))



# ---- Ray and data on the driver --------------------------------------------------------
# RAY_IGNORE_UNHANDLED_ERRORS: Ray Data's stats actor raises a harmless KeyError when a dataset
# of a stopped trial reports late (fire-and-forget calls, never awaited); hide those tracebacks.
# Where S3-compatible storage is and its region: handed to the job's workers (credentials are not:
# nodes get them from their instance profile or their own environment).
STORAGE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")
# Deprecations Ray raises about its own internals, in whichever process builds a trainer.
RAY_INTERNAL_WARNINGS = ("`ExecutionOptions.exclude_resources` is deprecated", "The given NumPy array is not writable")
QUIET_ENV = {"RAY_DEDUP_LOGS": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_USAGE_STATS_ENABLED": "0",
             "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0", "RAY_IGNORE_UNHANDLED_ERRORS": "1"}


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


# Ray's C++ components (raylet, GCS, core workers) log in glog format, e.g.
# "[2026-11-29 19:47:42,055 E 21044 21044] (gcs_server) gcs_actor_scheduler.cc:538: ..."
# and the raylet warns about "N PYTHON worker processes have been started" when Ray Data tasks with
# fractional CPUs start workers in bursts (expected here; nothing for the user to change).
RAY_COMPONENT_LOG = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [IWEF] \d+ \d+\] "
                               r"|.*PYTHON worker processes have been started on node"
                               # the stack dump a worker writes when it is terminated (an early-stopped trial)
                               r"|^\*\*\* SIGTERM received at time=|^(PC: )?\s*@ +0x[0-9a-f]+ ")


class StoppedTrialTracebacks:
    """Holds back, per process, a worker's traceback until its exception is known, and drops the
    two an early-stopped trial's workers print while they are torn down: the "Error in training
    function" whose data coordinator died with the trial's driver (``ActorDiedError`` ... "owner
    has died"), and the "Exception ignored in" note of the ``SystemExit`` that Ray's SIGTERM handler
    raises inside garbage collection. Any other traceback is passed on whole. A traceback spans
    several batches of lines."""

    TRAINING_ERROR, GC_NOTE = "Error in training function", "Exception ignored in:"
    CAUSE, GONE, SIGTERM_EXIT = "The actor is dead because", "owner has died", "in sigterm_handler"
    EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b")

    def __init__(self):
        self.held: dict = {}   # pid -> [lines, the exception is ActorDiedError]

    def __call__(self, pid, lines: list[str]) -> list[str]:
        out = []
        for line in lines:
            held = self.held.get(pid)
            if held is None:
                if line.startswith(self.GC_NOTE) or self.TRAINING_ERROR in line:
                    self.held[pid] = [[line], False]
                else:
                    out.append(line)
                continue
            held[0].append(line)
            if held[1] and self.CAUSE in line:      # Ray's last detail line: why the actor died
                if self.GONE not in line:           # not a stopped trial's teardown: show it
                    out += held[0]
                del self.held[pid]
            elif self.EXCEPTION.match(line):
                if line.startswith("ray.exceptions.ActorDiedError"):
                    held[1] = True                  # its last detail line says whose death
                    continue
                if not (line.startswith("SystemExit") and any(self.SIGTERM_EXIT in h for h in held[0])):
                    out += held[0]
                del self.held[pid]
            elif len(held[0]) > 200:                # not the expected ending after all: show it
                out += held[0]
                del self.held[pid]
        return out


class WorkerAbortDumps:
    """Collapses, per process, the crash dump of a Ray worker that Ray's C++ core aborts into one
    line. Seen here as idle Ray Data workers exit (Ray's "idle for a long time" shutdown): an abseil
    ``[mutex.cc ...] RAW: ... Mutex corrupt`` check, ``*** SIGABRT``, Python's ``Fatal Python error:
    Aborted`` and its list of ~100 extension modules. The run is unaffected (a training worker lost
    this way shows as Train's own failure and restart); the full dump stays in the Ray session's
    ``logs/old/worker-*-<pid>.err``."""

    START = re.compile(r"^\[mutex\.cc : \d+\] RAW: |^\*\*\* SIGABRT received at time=")
    PART = re.compile(START.pattern + r"|^Fatal Python error: Aborted|^\s*$|^(Current thread|Thread) 0x[0-9a-f]+ "
                      r"|^  File \"|^  <no Python frame>")
    LAST = "Extension modules: "   # faulthandler's last line

    def __init__(self):
        self.inside: set = set()   # pids whose dump is being read

    def __call__(self, pid, lines: list[str]) -> list[str]:
        out = []
        for line in lines:
            if pid in self.inside:
                if line.startswith(self.LAST):
                    self.inside.discard(pid)
                    continue
                if self.PART.match(line):
                    continue
                self.inside.discard(pid)
            if self.START.match(line):
                self.inside.add(pid)
                who, dump = (f"Ray worker process {pid}", f"logs/old/worker-*-{pid}.err") if isinstance(pid, int) \
                    else ("a Ray process", "logs")
                out.append(f"note: {who} aborted in Ray's C++ core (an abseil mutex check; a Ray issue, seen as idle "
                           f"workers exit). Ray starts workers as needed; the dump is in the Ray session's {dump}")
                continue
            out.append(line)
        return out


def hide_ray_component_logs() -> None:
    """Drop Ray's own C++ log lines (e.g. an actor killed twice at shutdown, logged as an error), the
    raylet's worker start-up warning, and what the workers of an early-stopped trial print while
    they are torn down (a SIGTERM stack dump, the data coordinator's ``ActorDiedError``, the SIGTERM
    handler's ``SystemExit`` noted during garbage collection) from what the cluster sends to this
    driver (worker logs and errors pushed to the driver), and shorten a worker's abort dump to one
    line (``WorkerAbortDumps``); the job's own output, other Python
    tracebacks and the raylet's other messages (e.g. OOM kills) pass. Wraps Ray's private
    ``print_to_stdstream`` (Ray is pinned < 2.61; if it moves, nothing is filtered); call before
    ``ray.init``, which binds it."""
    try:
        from ray._private import worker
        show = worker.print_to_stdstream
    except (ImportError, AttributeError):
        return
    if getattr(show, "raypipe_filter", False):
        return

    stopped_trials, aborts = StoppedTrialTracebacks(), WorkerAbortDumps()

    def filtered(data: dict, ignore_prefix: bool) -> None:
        pid = data.get("pid")
        lines = stopped_trials(pid, aborts(pid, [line for line in data.get("lines", [])
                                                 if not RAY_COMPONENT_LOG.match(line)]))
        if lines:
            show({**data, "lines": lines}, ignore_prefix)
    filtered.raypipe_filter = True
    worker.print_to_stdstream = filtered


def hide_internal_deprecations() -> None:
    """Warnings Ray raises about its own internals (Train's DataConfig sets a deprecated Ray Data
    option on every run): nothing a user can change, so hidden unless verbose, in the driver and
    in Train workers (Ray's DatasetManager actor still prints the first one once per run)."""
    import warnings

    if not verbose():
        # the second: Ray Data hands read-only NumPy views to torch.as_tensor; the batch is copied anyway
        for message in RAY_INTERNAL_WARNINGS:
            warnings.filterwarnings("ignore", message=message)


def quiet_ray_data() -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.verbose_progress = False

