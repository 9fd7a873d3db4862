"""Benchmark: start-up and scaling on Ray's real autoscaler (the ``fake_multinode`` provider with
cluster.yaml's node types, ``raypipe.fakecluster``), jobs submitted through the Jobs API.

(a) Time from job submission to the first epoch line of a phase-1 run (`raypipe pretrain`,
    ``resources.use_gpu=true``: its Train worker goes to a GPU node): once on a cold cluster (the GPU
    node launched by the autoscaler) and ``--warm-runs`` times on the warm one (the node up). Each
    line of the job's output is timed as it arrives, so the record says where the seconds go.
(b) Images/s of the same phase with 1 vs 2 Train workers, each on its own GPU node
    (``STRICT_SPREAD``), from the run's metrics.csv (mean over the epochs after the first).

On one machine the "nodes" are raylets sharing its cores: (b) measures what splitting one phase
over two workers costs or gains when both share the same CPUs (gloo all-reduce, split data, key
gathering), not the speed-up of two real GPU nodes.

    python bench/cluster_startup.py [--warm-runs 3] [--epochs 4] [--images-per-class 32]
"""
from __future__ import annotations

import argparse
import csv
import io
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: bench.record
from bench.record import ROOT, default_out, write_record  # noqa: E402
from raypipe.cluster import CLUSTER_CONFIG_ENV  # noqa: E402
from raypipe.fakecluster import FakeCluster, derive  # noqa: E402

DONE = ("SUCCEEDED", "FAILED", "STOPPED")


def submit_and_time(fc: FakeCluster, entrypoint: str, timeout: float = 900) -> dict:
    """Submit ``entrypoint``; -> seconds from submission to the job running, to each new line of
    its output (polled every 0.1 s), to its first epoch line and to its end, and the lines."""
    client = fc.client()
    t0 = time.perf_counter()
    job = client.submit_job(entrypoint=entrypoint)
    lines, seen, running, status = [], 0, None, ""
    while time.perf_counter() - t0 < timeout:
        status = str(client.get_job_status(job)).rsplit(".", 1)[-1]
        now = time.perf_counter() - t0
        if running is None and status != "PENDING":
            running = now
        text = client.get_job_logs(job)
        new = text.splitlines()[seen:]
        seen += len(new)
        lines += [(round(now, 2), line) for line in new if line.strip()]
        if status in DONE:
            break
        time.sleep(0.1)
    if status != "SUCCEEDED":
        raise RuntimeError(f"job {job} {status}:\n" + "\n".join(line for _, line in lines[-40:]))
    first_epoch = next((t for t, line in lines if " epoch " in line and "epoch   0" in line), None)
    return {"to_running_s": running, "to_first_line_s": lines[0][0] if lines else None,
            "to_first_epoch_line_s": first_epoch, "to_end_s": round(time.perf_counter() - t0, 2),
            "lines": [f"{t:7.2f}s  {line[:160]}" for t, line in lines]}


def images_per_s(metrics_csv: Path) -> tuple[float, int]:
    rows = list(csv.DictReader(io.StringIO(metrics_csv.read_text())))
    later = [float(r["images_per_s"]) for r in rows[1:]] or [float(rows[0]["images_per_s"])]
    return statistics.mean(later), int(float(rows[-1]["nodes"]))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--warm-runs", type=int, default=3)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--images-per-class", type=int, default=32)
    p.add_argument("--cpu-scale", type=float, default=0.25)
    p.add_argument("--out", default=default_out(__file__))
    args = p.parse_args()
    from raypipe.demo import make_demo_data

    work = Path(tempfile.mkdtemp(prefix="raypipe_bench_cluster_"))
    data = work / "data"
    make_demo_data(data, {"train": args.images_per_class, "val": 8, "test": 1}, size=32)
    runs = work / "runs"
    tiny = ["data.resolution=32", "data.decode_size=36", "teacher.backbone=resnet18", "teacher.batch_size=16",
            "teacher.moco.queue_size=64", "teacher.moco.proj_hidden=128", "teacher.knn_k=10",
            "resources.use_gpu=true", "resources.cpus_per_worker=0.5", f"output_dir={runs}"]

    def entry(name: str, *more: str) -> str:
        return shlex.join([sys.executable, "-m", "raypipe.cli", "pretrain", str(data), "--name", name, *tiny, *more])

    launcher = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    folder = work / "cluster"
    # nodes stay up between runs (10 min idle timeout): "warm" means the GPU node is there
    fc = FakeCluster(derive(launcher, cpu_scale=args.cpu_scale, idle_timeout_minutes=10), folder,
                     env={"RAYPIPE_AUTOSCALING": "1", CLUSTER_CONFIG_ENV: str(folder / "autoscaler.yaml")})
    images = sum(1 for f in (data / "train").rglob("*") if f.is_file())
    results = {"cpu_scale": args.cpu_scale, "images": images, "epochs": args.epochs}
    t = time.perf_counter()
    with fc:
        results["cluster_start_s"] = round(time.perf_counter() - t, 2)
        cold = submit_and_time(fc, entry("cold", "teacher.epochs=1"))
        results["cold"] = cold
        print(f"cold: first epoch line {cold['to_first_epoch_line_s']} s after submission", flush=True)
        warm = [submit_and_time(fc, entry(f"warm{i}", "teacher.epochs=1")) for i in range(args.warm_runs)]
        results["warm"] = warm
        firsts = [w["to_first_epoch_line_s"] for w in warm]
        results["warm_first_epoch_line_s"] = {"median": statistics.median(firsts), "min": min(firsts),
                                              "max": max(firsts), "each": firsts}
        print(f"warm: first epoch line {firsts} s after submission", flush=True)
        write_record(args.out, results)
        scaling = {}
        for n in (1, 2):
            name = f"workers{n}"
            run = submit_and_time(fc, entry(name, f"teacher.epochs={args.epochs}", f"resources.num_workers={n}",
                                            "resources.placement_strategy=STRICT_SPREAD"))
            rate, nodes = images_per_s(runs / name / "metrics.csv")
            scaling[n] = {"images_per_s": round(rate, 1), "nodes": nodes, "wall_s": run["to_end_s"]}
            print(f"{n} worker(s) on {nodes} node(s): {rate:.1f} images/s", flush=True)
        scaling["ratio_2_vs_1"] = round(scaling[2]["images_per_s"] / scaling[1]["images_per_s"], 3)
        results["scaling"] = scaling
        write_record(args.out, results)
    print(f"record: {args.out}")


if __name__ == "__main__":
    main()
