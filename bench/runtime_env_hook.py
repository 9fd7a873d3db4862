"""Benchmark: a short phase 1 under three runtime_envs of the job's ``ray.init``: none, ``env_vars``
only (what raypipe passes: raypipe/cluster.py, ``ensure_ray``) and ``env_vars`` + a
``worker_process_setup_hook`` (a trivial one: it sets a logging level). Reported: the trainer's
images/s of every epoch (the run's metrics.csv), their mean over the second half of the epochs, the
ratio of each variant's mean to the ``env_vars`` one's, and how many Python worker processes each
run's Ray session started (the worker log files of its session, a PID each).

Each variant is the command of docs/benchmarks.md section 4,

    raypipe pretrain DATA --config experiments/configs/cifar10_50/base.yaml \\
        teacher.epochs=6 teacher.knn_every=10 output_dir=TMP --name NAME

run in-process (``raypipe.cli.main``) in a process of its own that starts its own local Ray cluster
and shuts it down, one variant after the other. Nothing of raypipe is changed: in that process
``ray.init`` is wrapped so that raypipe's own (and only) call of it gets the variant's runtime_env in
place of raypipe's; every other argument and everything raypipe sets around it (the environment the
local cluster inherits, logging) is raypipe's own.

    python bench/runtime_env_hook.py [--epochs 6] [--data ../shared/data/cifar10-50]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository: bench.record
from bench.record import default_out, write_record

DATA = ROOT.parent / "shared" / "data" / "cifar10-50"
CONFIG = "experiments/configs/cifar10_50/base.yaml"
VARIANTS = ("none", "env_vars", "hook")   # in the order of the table


def quiet_logging() -> None:
    """The trivial worker_process_setup_hook of the third variant. The variant's process runs this file as
    __main__, so Ray pickles the function by value: its workers need not import bench/."""
    import logging
    logging.getLogger("ray").setLevel(logging.ERROR)


def variant_runtime_env(variant: str, raypipe_env: dict | None) -> dict | None:
    """The runtime_env ``ray.init`` gets in ``variant``, from the one raypipe passes."""
    if variant == "none":
        return None
    env = {**(raypipe_env or {}), "env_vars": dict((raypipe_env or {}).get("env_vars", {}))}
    if variant == "hook":
        env["worker_process_setup_hook"] = quiet_logging
    return env


def describe(runtime_env: dict | None) -> dict:
    """What a runtime_env holds, for the record: its keys, the names of its env_vars, the hook's name."""
    if not runtime_env:
        return {}
    return {k: (sorted(v) if k == "env_vars" else getattr(v, "__name__", v)) for k, v in runtime_env.items()}


def worker_pids(logs_dir: Path) -> int | None:
    """Distinct PIDs of the Python worker processes a Ray session started: its logs/worker-*.out files
    (worker-<worker id>-[<job id>-]<pid>.out). None where there are none (logs not written to files)."""
    pids = {p.stem.rsplit("-", 1)[1] for p in Path(logs_dir).glob("worker-*.out")}
    return len(pids) or None


def epoch_rates(run_dir: Path) -> tuple[list[int], list[float]]:
    """The epochs and their images/s, from the run's metrics.csv (raypipe.loop.EpochLog)."""
    import csv

    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [int(r["epoch"]) for r in rows], [float(r["images_per_s"]) for r in rows]


def summarize(runs: dict, epochs: int) -> dict:
    """The record's results from each variant's run (``run_variant``'s JSON): per variant its images/s per
    epoch and their mean over the second half of the epochs, each mean's ratio to the ``env_vars`` one's."""
    steady_from, variants = epochs // 2, {}
    for variant in VARIANTS:
        r = {k: v for k, v in runs[variant].items() if k != "images"}
        steady = [x for e, x in zip(r["epochs"], r["images_per_s"]) if e >= steady_from]
        variants[variant] = {**r, "steady_images_per_s": sum(steady) / len(steady)}
    base = variants["env_vars"]["steady_images_per_s"]
    return {"images": runs["env_vars"]["images"], "epochs": epochs, "steady_from": steady_from, "variants": variants,
            "ratio_to_env_vars": {v: variants[v]["steady_images_per_s"] / base for v in VARIANTS}}


def run_variant(args) -> None:
    """One variant, in this process: the pretrain command with raypipe's ``ray.init`` given the variant's
    runtime_env; its figures to ``args.result`` (JSON)."""
    import ray

    from raypipe.cli import main as raypipe_main

    init, calls = ray.init, []

    def variant_init(*a, **kw):
        kw["runtime_env"] = variant_runtime_env(args.variant, kw.get("runtime_env"))
        calls.append(describe(kw["runtime_env"]))
        return init(*a, **kw)

    ray.init = variant_init
    out = Path(tempfile.mkdtemp(prefix=f"raypipe_bench_env_{args.variant}_"))
    name = f"env_{args.variant}"
    try:
        start = time.perf_counter()
        try:
            rc = raypipe_main(["pretrain", str(args.data), "--config", args.config, f"teacher.epochs={args.epochs}",
                               f"teacher.knn_every={max(10, args.epochs)}", f"output_dir={out}", "--name", name])
            wall = time.perf_counter() - start
            if rc != 0:
                sys.exit(f"{args.variant}: raypipe pretrain exited {rc}")
            if len(calls) != 1:
                sys.exit(f"{args.variant}: ray.init was called {len(calls)} times, expected raypipe's one call")
            try:   # Ray's private API (the session's log folder); the count is left out without it
                pids = worker_pids(ray._private.worker._global_node.get_logs_dir_path())
            except (AttributeError, OSError):
                pids = None
        finally:
            ray.shutdown()
        epochs, rates = epoch_rates(out / name)
        images = json.loads((out / name / "metrics.json").read_text()).get("n_train")
    finally:
        shutil.rmtree(out, ignore_errors=True)   # the run's checkpoints and models
    Path(args.result).write_text(json.dumps({"runtime_env": calls[0], "epochs": epochs, "images_per_s": rates,
                                             "wall_s": wall, "worker_pids": pids, "images": images}))

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--data", default=str(DATA), help="the data set (default: ../shared/data/cifar10-50 of the "
                                                     "repository)")
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--out", default=default_out(__file__))
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)   # internal: run one, in this process
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.data, args.config = Path(args.data).resolve(), str(Path(args.config).resolve() if Path(args.config).exists()
                                                            else ROOT / args.config)
    if args.variant:
        return run_variant(args)
    if not args.data.is_dir():
        print(f"skipping: no data set at {args.data}; give one with --data")
        return
    runs = {}
    with tempfile.TemporaryDirectory(prefix="raypipe_bench_env_") as tmp:
        for variant in VARIANTS:   # one after the other, each in its own process with its own Ray cluster
            result = Path(tmp) / f"{variant}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--variant", variant, "--result", str(result),
                   "--epochs", str(args.epochs), "--data", str(args.data), "--config", args.config]
            print(f"--- {variant}", flush=True)
            rc = subprocess.run(cmd, cwd=ROOT, check=False).returncode
            if rc != 0 or not result.is_file():
                sys.exit(f"variant {variant} failed (exit {rc}); no record written")
            runs[variant] = r = json.loads(result.read_text())
            print(f"{variant:>8}: images/s per epoch {' / '.join(f'{x:.1f}' for x in r['images_per_s'])}; "
                  f"{r['worker_pids']} worker processes; {r['wall_s']:.0f} s", flush=True)
    out = summarize(runs, args.epochs)
    for variant, v in out["variants"].items():
        print(f"{variant:>8}: {v['steady_images_per_s']:.1f} images/s, epochs {out['steady_from']}-{args.epochs - 1} "
              f"({out['ratio_to_env_vars'][variant]:.2f}x env_vars)")
    write_record(args.out, out)


if __name__ == "__main__":
    main()
