"""What raypipe prints and what it lets Ray print: the ``--verbose`` switch, and the filters that keep
Ray's own internals (C++ component logs, the teardown tracebacks of early-stopped trials, worker
abort dumps, deprecations about Ray's internals, Ray Data's progress bars) out of the output."""
from __future__ import annotations

import os
import re
import time

VERBOSE_ENV = "RAYPIPE_VERBOSE"


def verbose() -> bool:
    """``--verbose`` (or RAYPIPE_VERBOSE=1): Ray's and Tune's own output as well."""
    return os.environ.get(VERBOSE_ENV) == "1"


def set_verbose(on: bool) -> None:
    if on:
        os.environ[VERBOSE_ENV] = "1"


def quiet_worker() -> None:
    """In a Train worker: Train sets the root logger to INFO and some of its logs bypass ray.train."""
    if not verbose():
        import logging
        logging.getLogger().setLevel(logging.WARNING)
        hide_internal_deprecations()


# Deprecations Ray raises about its own internals, in whichever process builds a trainer.
RAY_INTERNAL_WARNINGS = ("`ExecutionOptions.exclude_resources` is deprecated", "The given NumPy array is not writable")
# RAY_IGNORE_UNHANDLED_ERRORS: Ray Data's stats actor raises a harmless KeyError when a dataset
# of a stopped trial reports late (fire-and-forget calls, never awaited); hide those tracebacks.
QUIET_ENV = {"RAY_DEDUP_LOGS": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_USAGE_STATS_ENABLED": "0",
             "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0", "RAY_IGNORE_UNHANDLED_ERRORS": "1"}


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


class OnceNotes:
    """Shows each ``note: ...`` line once per driver: a note a worker makes about its node (e.g. a
    logical GPU torch cannot see, noted by every Train run) is said once for the whole job."""

    def __init__(self):
        self.seen: set = set()

    def __call__(self, pid, lines: list[str]) -> list[str]:
        out = []
        for line in lines:
            if line.startswith("note: "):
                if line in self.seen:
                    continue
                self.seen.add(line)
            out.append(line)
        return out


class AutoscalerEvents:
    """The autoscaler's events as the driver shows them, for people: nodes added and removed, without
    the "Resized to N CPUs" total after every change; each once (on one machine every node's log
    monitor forwards the autoscaler's log, so a fake cluster's events came two to four times)."""

    EVENT, KEEP = ":event_summary:", re.compile(r":event_summary:(Adding|Removing) ")

    def __init__(self, window_s: float = 2.0):
        self.window_s, self.last = window_s, {}

    def __call__(self, pid, lines: list[str]) -> list[str]:
        if pid != "autoscaler":
            return lines
        out, now = [], time.monotonic()
        for line in lines:
            if self.EVENT in line:
                if not self.KEEP.search(line):
                    continue
                event = line.split(self.EVENT, 1)[1]
                if now - self.last.get(event, -self.window_s) < self.window_s:
                    continue
                self.last[event] = now
            out.append(line)
        return out


def hide_ray_component_logs() -> None:
    """Drop Ray's own C++ log lines (e.g. an actor killed twice at shutdown, logged as an error), the
    raylet's worker start-up warning, and what the workers of an early-stopped trial print while
    they are torn down (a SIGTERM stack dump, the data coordinator's ``ActorDiedError``, the SIGTERM
    handler's ``SystemExit`` noted during garbage collection) from what the cluster sends to this
    driver (worker logs and errors pushed to the driver), and shorten a worker's abort dump to one
    line (``WorkerAbortDumps``), show each worker note once (``OnceNotes``) and each autoscaler event
    once, without its resource totals (``AutoscalerEvents``); the job's own output, other Python
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

    stopped_trials, aborts, notes, autoscaler = StoppedTrialTracebacks(), WorkerAbortDumps(), OnceNotes(), AutoscalerEvents()

    def filtered(data: dict, ignore_prefix: bool) -> None:
        pid = data.get("pid")
        lines = autoscaler(pid, notes(pid, stopped_trials(pid, aborts(pid, [
            line for line in data.get("lines", []) if not RAY_COMPONENT_LOG.match(line)]))))
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
    import logging

    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.verbose_progress = False
    if not verbose():   # Ray Data set its level when first imported, before RAY_DATA_LOG_LEVEL was set here
        logging.getLogger("ray.data").setLevel(os.environ.get("RAY_DATA_LOG_LEVEL", "ERROR"))

