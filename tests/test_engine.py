"""The shared training loop pieces: LR schedule, frozen parameters, multi-worker state (gloo, 2 ranks)."""
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from raypipe.config import load_config
from raypipe.loop import lr_at, optimizer_step, scaled_lr


def test_lr_scales_with_the_global_batch_warms_up_linearly_then_follows_the_schedule():
    t = load_config(overrides=["teacher.lr=0.24", "teacher.batch_size=32", "teacher.epochs=10",
                               "teacher.warmup_epochs=2", "teacher.schedule=cosine"]).teacher
    assert scaled_lr(t, 1) == pytest.approx(0.03) and scaled_lr(t, 4) == pytest.approx(0.12)
    base = 0.1
    assert lr_at(t, base, 0.0) < 1e-3 * base and lr_at(t, base, 1.0) == pytest.approx(0.05, rel=1e-3)
    assert lr_at(t, base, 2.0) == pytest.approx(base)                     # warm-up ends at the peak
    assert lr_at(t, base, 6.0) == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert lr_at(t, base, 10.0) == pytest.approx(0.0, abs=1e-12)           # cosine to zero at the end
    s = load_config(overrides=["student.schedule=step", "student.step_epochs=30", "student.step_gamma=0.1",
                               "student.warmup_epochs=0", "student.epochs=100"]).student
    assert [lr_at(s, 1.0, e) for e in (0, 29.9, 30, 65, 95)] == pytest.approx([1, 1, 0.1, 0.01, 0.001])


def test_frozen_parameters_get_no_gradient_decay_or_momentum():
    """Connectors during the CE-only warm-up: weight decay and Nesterov momentum must not move them."""
    torch.manual_seed(0)
    trained, frozen = nn.Linear(4, 4), nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4))
    before = [p.clone() for p in frozen.parameters()]
    params = [*trained.parameters(), *frozen.parameters()]
    opt = torch.optim.SGD(params, lr=0.5, momentum=0.9, weight_decay=0.1, nesterov=True)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for _ in range(3):
        x = torch.randn(8, 4)
        conn = frozen(x.view(8, 4, 1, 1)).sum() * 0.0   # in the graph, zero weight (as before distillation)
        optimizer_step(F.mse_loss(trained(x), x) + conn, opt, scaler, params, 0.0, frozen=list(frozen.parameters()))
    assert all(torch.equal(p, b) for p, b in zip(frozen.parameters(), before))
    assert all(id(p) not in {id(q) for q in opt.state} for p in frozen.parameters())   # no momentum buffer
    # the same steps without `frozen`: weight decay alone shrinks the BN gamma (the bug this prevents)
    optimizer_step(frozen(torch.randn(8, 4, 1, 1)).sum() * 0.0, opt, scaler, params, 0.0)
    assert frozen[1].weight.abs().max() < 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_rank_state(rank: int, port: int, out: dict) -> None:
    import torch.distributed as tdist

    from raypipe import dist
    from raypipe.loop import Runtime, wrap_ddp
    from raypipe.teacher import build_method

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(100 + rank)   # each worker seeds differently (seed + rank), as make_runtime does
    cfg = load_config(overrides=["teacher.moco.queue_size=8", "teacher.moco.proj_hidden=16", "teacher.moco.proj_dim=4",
                                 "teacher.batch_size=4", "resources.num_workers=2"])
    model = build_method(cfg, world_size=2).model
    net = wrap_ddp(model, Runtime(torch.device("cpu"), None, False, 2, rank))
    queue_at_start = model.queue.clone()
    model.train()
    # different data per rank -> different BN running statistics per rank
    net(torch.randn(4, 3, 16, 16) + 3 * rank, torch.randn(4, 3, 16, 16) + 3 * rank)
    bn = model.backbone.bn1
    local_mean = bn.running_mean.clone()
    dist.average_bn_statistics(model)
    out[rank] = {"queue": queue_at_start.tolist(), "local_mean": local_mean.tolist(), "mean": bn.running_mean.tolist(),
                 "split_bn": any(type(m).__name__ == "SplitBatchNorm2d" for m in model.modules())}
    tdist.destroy_process_group()


def _spawn_entry(rank, port, queue):
    out = {}
    _two_rank_state(rank, port, out)
    queue.put((rank, out[rank]))


def test_two_workers_start_with_one_queue_and_evaluate_with_averaged_bn_statistics():
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_spawn_entry, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    a, b = ({k: torch.tensor(v) if isinstance(v, list) else v for k, v in results[r].items()} for r in (0, 1))
    assert torch.equal(a["queue"], b["queue"])                      # rank 0's queue everywhere from step one
    assert not a["split_bn"] and not b["split_bn"]                   # several workers: per-worker BN
    assert not torch.allclose(a["local_mean"], b["local_mean"])      # the ranks' statistics differed ...
    assert torch.allclose(a["mean"], b["mean"])                      # ... and are now one set
    assert torch.allclose(a["mean"], (a["local_mean"] + b["local_mean"]) / 2, atol=1e-6)


# What an idle Ray Data worker printed as Ray's C++ core aborted it on exit (README command 1,
# 2026-12-02; the glog copies of the SIGABRT lines and the stack frames are Ray component lines).
ABORT_DUMP = ["[mutex.cc : 452] RAW: Lock blocking 0x55d1d9faa430   @ 0x7f1d72a2b1a2 0x7f1d71afb23c",
              "[mutex.cc : 1957] RAW: Check (v & (kMuWait | kMuWrWait)) != kMuWrWait failed: Lock: Mutex corrupt: "
              "waiting writer with no waiters: 0x7f1d73f57470",
              "*** SIGABRT received at time=1796193973 on cpu 1 ***",
              "PC: @     0x7f1d738a8eec  (unknown)  (unknown)", "    @     0x7f1d7385a050       9104  (unknown)",
              "[2026-12-02 06:46:13,287 E 8845 9329] logging.cc:474: *** SIGABRT received at time=1796193973 on cpu 1 ***",
              "Fatal Python error: Aborted", "", "",
              "Extension modules: msgpack._cmsgpack, google._upb._message, ray._raylet, torch._C (total: 102)"]


def test_a_worker_abort_dump_becomes_one_line_per_process():
    from raypipe.console import RAY_COMPONENT_LOG, WorkerAbortDumps
    dump = [line for line in ABORT_DUMP if not RAY_COMPONENT_LOG.match(line)]
    collapse = WorkerAbortDumps()
    first = collapse(8845, ["epoch 3", *dump[:3]])
    assert len(first) == 2 and first[0] == "epoch 3" and "Ray worker process 8845 aborted" in first[1]
    assert "worker-*-8845.err" in first[1]
    assert collapse(8845, [*dump[3:], "after"]) == ["after"]          # the rest of the dump, in a later batch
    assert collapse(8845, dump) == first[1:]                         # a second abort: one line again
    no_pid = collapse("raylet", dump[2:])                            # from the raylet's log: no file hint
    assert len(no_pid) == 1 and "a Ray process aborted" in no_pid[0] and "worker-*" not in no_pid[0]
    fault = ["Fatal Python error: Segmentation fault", "", "Current thread 0x7f (most recent call first):",
             '  File "/repo/raypipe/teacher.py", line 80 in train_loop']
    assert collapse(11, fault) == fault                             # any other crash: shown whole
    assert collapse(11, ["", "Extension modules: x"]) == ["", "Extension modules: x"]   # outside a dump: kept


def test_a_workers_note_is_said_once_per_job():
    from raypipe.console import OnceNotes
    note = "note: Ray assigned GPUs that torch cannot see (no CUDA device on the node): training on CPU (process group: gloo)"
    once = OnceNotes()
    assert once(1, ["pretrain epoch   0", note]) == ["pretrain epoch   0", note]
    assert once(2, [note, "pretrain epoch   1"]) == ["pretrain epoch   1"]     # another run's worker: not again
    assert once(3, ["note: something else", "epoch"]) == ["note: something else", "epoch"]
    assert once(4, ["a line", "a line"]) == ["a line", "a line"]                 # only notes are deduplicated


def test_autoscaler_events_show_each_node_change_once_without_totals():
    from raypipe.console import AutoscalerEvents
    add = "2026-12-06 04:38:10,758\tINFO monitor.py:438 -- :event_summary:Adding 1 node(s) of type gpu_1x."
    resized = "2026-12-06 04:38:11,001\tINFO monitor.py:438 -- :event_summary:Resized to 4 CPUs, 1 GPUs."
    gone = "2026-12-06 04:39:01,001\tINFO monitor.py:438 -- :event_summary:Removing 1 nodes of type gpu_1x (idle)."
    events = AutoscalerEvents(window_s=60)
    assert events("autoscaler", [add, resized, add]) == [add]          # forwarded twice: shown once
    assert events("autoscaler", [add, gone]) == [gone]
    assert events(4321, [resized]) == [resized]                         # a worker's own line passes
    assert AutoscalerEvents(window_s=0)("autoscaler", [add, add]) == [add, add]   # later events are new ones


def test_ray_component_logs_are_hidden_from_the_driver_unless_verbose(ray_cluster, capsys):
    """Lines the cluster sends to the driver (worker logs, errors pushed by the raylet): Ray's C++
    log lines and the raylet's worker start-up burst warning are dropped, the job's own pass."""
    from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher
    internal = ("[2026-11-29 19:47:42,055 E 21044 21044] (gcs_server) gcs_actor_scheduler.cc:538: Failed to kill "
                "actor 5211")
    burst = ("WARNING: 8 PYTHON worker processes have been started on node: e3ea with address: 192.0.2.2, "
             "which is 4x the maximum expected startup concurrency (2).")
    oom = "A worker died or was killed while executing a task by an unexpected system error (OOM)."
    dispatcher.emit({"lines": [internal, "skipped 3 unreadable image(s)"], "pid": 1234, "is_err": True,
                     "ip": "127.0.0.1", "job": "01000000"})
    dispatcher.emit({"lines": ABORT_DUMP, "pid": 8845, "is_err": True, "ip": "127.0.0.1", "job": "01000000"})
    from ray._private import worker   # errors the raylet pushes to the driver take this path
    worker.print_to_stdstream({"lines": [burst, oom], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    out = capsys.readouterr()
    assert "skipped 3 unreadable image(s)" in out.err and "gcs_actor_scheduler.cc" not in out.err
    assert "Ray worker process 8845 aborted" in out.err and "Extension modules" not in out.err
    assert oom in out.out and "PYTHON worker processes" not in out.out


def test_stopped_trial_teardown_is_hidden_and_real_worker_errors_pass():
    """What an early-stopped trial's Train worker prints while it is torn down (seen in the main
    job's output): its SIGTERM stack dump and the ActorDiedError of its data coordinator, whose
    owner (the trial's driver) is gone. Split over batches of lines, as the log monitor sends them.
    Any other traceback of a worker passes whole, in order."""
    from raypipe.console import RAY_COMPONENT_LOG, StoppedTrialTracebacks
    dump = ["*** SIGTERM received at time=1796003067 on cpu 1 ***",
            "PC: @     0x7f6e5a6a3f16  (unknown)  (unknown)", "    @     0x7f6e5a65a050  (unknown)  (unknown)"]
    assert all(RAY_COMPONENT_LOG.match(line) for line in dump)
    assert not RAY_COMPONENT_LOG.match("*** SIGSEGV received at time=1796003067 on cpu 1 ***")
    head = ["Error in training function:", "Traceback (most recent call last):",
            '  File "/repo/raypipe/student.py", line 106, in train_loop', "    for batch in loop.batches(epoch):"]
    died = ["ray.exceptions.ActorDiedError: The actor died unexpectedly before finishing this task.",
            "\tclass_name: SplitCoordinator", "\tactor_id: 0f4d654f97e05b970a62cd1801000000"]
    owner_gone = ["The actor is dead because its owner has died. Owner Id: 1e91 Owner Ip address: 192.0.2.2"]
    filt = StoppedTrialTracebacks()
    assert filt(7, ["epoch line", *head]) == ["epoch line"]       # held back until the exception is known
    assert filt(7, died) == [] and filt(7, [*owner_gone, "next line"]) == ["next line"]
    real = [*head, "ValueError: teacher weights do not fit resnet18"]
    assert filt(8, real[:3]) == [] and filt(8, real[3:]) == real   # another error: whole, in order
    killed = [*head, *died, "The actor is dead because it was killed by `ray.kill`."]
    assert filt(9, killed) == killed                              # another actor death: shown
    assert filt(10, head) == [] and filt(11, ["other process"]) == ["other process"]  # per process
    ignored = ["Exception ignored in: <function WeakSet.__init__.<locals>._remove at 0x7f6ce813e520>",
               "Traceback (most recent call last):",
               '  File "/usr/lib/python3.11/_weakrefset.py", line 39, in _remove', "",
               '  File "/venv/ray/_private/worker.py", line 1063, in sigterm_handler',
               '  File "python/ray/_raylet.pyx", line 712, in ray._raylet.raise_sys_exit_with_custom_error_message']
    assert filt(12, ignored[:4]) == [] and filt(12, [*ignored[4:], "SystemExit: 1", "after"]) == ["after"]
    other_gc = [*ignored[:4], "KeyError: 3"]                      # another exception during GC: shown
    assert filt(13, other_gc) == other_gc
    not_sigterm = [*ignored[:4], "SystemExit: 1"]                 # SystemExit not from Ray's handler
    assert filt(14, not_sigterm) == not_sigterm
