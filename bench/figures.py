"""The benchmarks' figures in the docs, rendered from the records the benchmarks write.

Every benchmark of this folder writes its record (its figures with the command, date and machine that
produced them: bench/record.py) to docs/bench/<name>.json. Each ``Figure`` here is one generated block of
a doc, between ``<!-- figures:KEY:begin ... -->`` and ``<!-- figures:KEY:end -->``: the command(s) that
wrote its records, where they are, and the figures rendered from them. ``python experiments/tables.py``
rewrites every block whose records are here and names the others; ``--check`` rewrites nothing.
Only JSON is read here (no torch, no Ray): the check runs in a second.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

TABLES = "python experiments/tables.py"


@dataclass(frozen=True)
class Figure:
    key: str                    # its markers: <!-- figures:KEY:begin ... --> / <!-- figures:KEY:end -->
    doc: str                    # the doc that shows it (relative to the repository)
    records: tuple[str, ...]    # the records it is rendered from (relative to the repository)
    commands: tuple[str, ...]   # the command that writes each record; "" where no script does
    render: Callable            # (figure, [record, ...]) -> the figures (markdown), below the commands
    lacks: Callable | None = None   # (figure, [record, ...]) -> what the records lack that the figures need
    note: str = ""              # how the figures were measured where no script writes the record
    brief: bool = False         # a further block of a record the doc shows in full elsewhere: one line of source

    @property
    def begin(self) -> str:
        return f"<!-- figures:{self.key}:begin (written by {TABLES} from {', '.join(self.records)}) -->"

    @property
    def end(self) -> str:
        return f"<!-- figures:{self.key}:end -->"

    def link(self, record: str) -> str:
        """A record as a markdown link, relative to the doc."""
        rel = os.path.relpath(record, Path(self.doc).parent)
        return f"[`{rel}`]({rel})"

    def block(self, records: list[dict]) -> str:
        """The whole block, markers included: the records' own commands, where and when they ran, the figures
        (``brief``: the figures, then the record and its date on one line)."""
        figures = self.render(self, records).strip()
        if self.brief:
            made = "; ".join(f"{self.link(path)} of {rec['date'][:10]}" for path, rec in zip(self.records, records))
            return "\n".join([self.begin, "", figures, "", f"(From {made}.)", "", self.end])
        made = "; ".join(f"{self.link(path)}: {rec['date'][:10]}, {rec['machine']} ({rec.get('cpu', '-')})"
                         for path, rec in zip(self.records, records))
        return "\n".join([self.begin, "", "```", *(rec["command"] for rec in records), "```", "",
                          f"Record{'s' if len(records) > 1 else ''}: {made}.", "", figures, "", self.end])


# ---- cells ------------------------------------------------------------------------------------------------
def rate(x: float) -> str:
    """images/s: whole numbers from 100 up, one decimal below."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def ratio(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{x:.2f}x"


def count(x: float) -> str:
    """A median count of epochs; "never" where the median run does not get there (inf)."""
    return f"{x:.0f}" if math.isfinite(x) else "never"


def over(a: float, b: float) -> str:
    """a / b as a ratio; "-" where either is not a number reached (never: inf)."""
    return ratio(a / b) if math.isfinite(a) and math.isfinite(b) and b else "-"


def interval(v: list[float], sign: str = "") -> str:
    """A value with its 95% interval, as the replay stores them: [value, lo, hi]."""
    return f"{v[0]:{sign}.2f} [{v[1]:{sign}.2f}, {v[2]:{sign}.2f}]"


def table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *("| " + " | ".join(r) + " |" for r in rows)])


# ---- section 1: data path -----------------------------------------------------------------------------------
def data_path(fig, records) -> str:
    rows, seen = [], set()
    for rec in records:   # the second record adds its larger demo set (its cifar10-50 row repeats the first's)
        for row in rec["results"]["results"]:
            if row["set"] in seen:
                continue
            seen.add(row["set"])
            dl, rd = row["dataloader_img_s"], row["ray_data_img_s"]
            rows.append([row["set"], f"{rate(dl[0])} / {rate(mean(dl[1:]))}", f"{rate(rd[0])} / {rate(mean(rd[1:]))}",
                         f"**{ratio(row['steady_ratio'])}**"])
    return table(["data set", "DataLoader img/s cold / steady", "Ray Data img/s cold / steady", "ratio steady"], rows)


# ---- section 2: trainer overhead ----------------------------------------------------------------------------
def trainer_overhead(fig, records) -> str:
    r = records[0]["results"]
    plain, train = mean(r["plain_epoch_s"][1:]), mean(r["train_epoch_s"][1:])
    goal = "met" if r["steady_ratio"] <= 1.10 else "not met"
    return "\n".join([
        table(["", "the loop in this process", "TorchTrainer", "ratio"],
              [[f"seconds per epoch, epochs 2-{r['epochs']} (train steps)", f"{plain:.2f}", f"{train:.2f}",
                f"**{ratio(r['steady_ratio'])}** (goal <= 1.10x: {goal})"],
               ["whole run incl. start-up", f"{r['plain_wall_s']:.1f} s", f"{r['train_wall_s']:.1f} s",
                ratio(r["wall_ratio"])]]),
        "", (f"{r['images']} images x {r['epochs']} epochs; the TorchTrainer run's fixed cost (its whole run minus "
             f"the in-process one): {r['train_wall_s'] - r['plain_wall_s']:.0f} s.")])


# ---- section 3: stem stride ---------------------------------------------------------------------------------
def stem_stride(fig, records) -> str:
    r = records[0]["results"]
    return table(["", "stride 1 (usual CIFAR stem)", "stride 2 (`stem_stride: 2`)", "ratio"],
                 [["train images/s", rate(r["stride1_train_img_s"]), rate(r["stride2_train_img_s"]),
                   f"**{r['train_speedup']:.2f}x**"],
                  ["eval images/s", rate(r["stride1_eval_img_s"]), rate(r["stride2_eval_img_s"]),
                   f"**{r['eval_speedup']:.2f}x**"]])


# ---- section 4: the job's runtime_env ------------------------------------------------------------------------
RUNTIME_ENVS = {"none": "none", "env_vars": "`env_vars` only (what raypipe passes)",
                "hook": "`env_vars` + `worker_process_setup_hook`"}


def runtime_env_hook(fig, records) -> str:
    r = records[0]["results"]
    first, last = r["steady_from"], r["epochs"] - 1
    epochs = r["variants"]["env_vars"]["epochs"]
    rows = [[label, " / ".join(rate(x) for x in v["images_per_s"]), rate(v["steady_images_per_s"]),
             f"**{ratio(r['ratio_to_env_vars'][key])}**" if key == "hook" else ratio(r["ratio_to_env_vars"][key]),
             "-" if v["worker_pids"] is None else str(v["worker_pids"])]
            for key, label in RUNTIME_ENVS.items() for v in [r["variants"][key]]]
    return "\n".join([
        table(["`ray.init(runtime_env=...)` of the job", f"images/s, epochs {epochs[0]}-{epochs[-1]}",
               f"mean, epochs {first}-{last}", "vs `env_vars` only", "worker processes started"], rows), "",
        (f"{r['images']} training images (two views each) per epoch. Each row is a run of its own: its own process "
         "and local Ray cluster, raypipe's `ray.init` given the row's `runtime_env`; its worker processes are the "
         "Python workers that cluster started (a PID each).")])


# ---- section 5: views on the device ---------------------------------------------------------------------------
def augment(fig, records) -> str:
    return table(["resolution", "per image, torchvision v2 (Ray Data's map)", "per batch, kornia, on the CPU", "ratio"],
                 [[f"{r['resolution']} px", rate(r["per_image_cpu"]), rate(r["batched_kornia_cpu"]), ratio(r["ratio"])]
                  for r in records[0]["results"]])


def phase1_views(fig, records) -> str:
    r = records[0]["results"]
    return table(["views made by", "images/s (epochs 2-N)", "run wall time (decode + N epochs)"],
                 [["Ray Data tasks, per image (`cpu`)", f"{r['cpu']['images_per_s']:.1f}", f"{r['cpu']['wall_s']:.0f} s"],
                  ["the trainer, per batch (`device`, here the CPU)", f"{r['device']['images_per_s']:.1f}",
                   f"{r['device']['wall_s']:.0f} s"],
                  ["ratio device / cpu", ratio(r["ratio"]), ratio(r["cpu"]["wall_s"] / r["device"]["wall_s"])]])


GPU_ROWS = {"premade": "premade on the GPU (the step alone)", "device": "on the GPU, per batch (kornia, `device`)",
            "cpu": "on CPU, per image, {workers} worker processes (`cpu`)",
            "premade + compile": "premade, the step through `torch.compile`"}


def gpu_phases(fig, records) -> str:
    r = records[0]["results"]
    per_core, workers = r["aug_cpu_two_view_per_core"], r["cpu_workers"]
    rows = []
    for phase, label in (("phase1", "1 (MoCo v2 + margin, two views)"),
                         ("phase2", f"2 (OFD distill, {r['backbone']} teacher)")):
        done = r.get(phase, {})
        for i, (key, text) in enumerate((k, t) for k, t in GPU_ROWS.items() if k in done):
            cell = rate(done[key])
            if key == "cpu" and phase == "phase1":   # its workers' own ceiling: workers x one core's two-view rate
                cell += f" (the workers' ceiling: {workers} x {per_core:.1f} = {rate(workers * per_core)})"
            rows.append([label if i == 0 else phase[-1], text.format(workers=workers), cell,
                         f"{done[key] / done['premade']:.2f}" if "premade" in done else "-"])
    return "\n".join([
        f"{r['device']}, torch {r['torch']}; {r['backbone']}, {r['resolution']} px, batch {r['batch']}.", "",
        table(["phase", "views made", "training images/s", "vs premade"], rows), "",
        table(["the views alone, same run", "images/s"],
              [[f"MoCo two views on the GPU (kornia, batch {r['batch']})", rate(r["aug_device_two_view"])],
               ["MoCo two views on one CPU core of that node (torchvision, per image)", rate(per_core)]])])


def gpu_phases_compile(fig, records) -> str:
    r = records[0]["results"]
    speed = {p: r[p]["premade + compile"] / r[p]["premade"] for p in ("phase1", "phase2")
             if "premade + compile" in r.get(p, {})}
    if not speed:
        return f"No compiled rows in this record ({r['device']}, torch {r['torch']})."
    where = "the CPU" if r["device"] == "cpu" else r["device"]
    return (f"`torch.compile` on {where} (torch {r['torch']}; `--tiny`: {r['backbone']}, {r['resolution']} px): "
            "the compiled step ran at " + " and ".join(f"{v:.2f}x ({p[:-1]} {p[-1]})" for p, v in speed.items())
            + " of eager.")


# ---- section 6: is a phase-1 epoch fed ------------------------------------------------------------------------
def phase1_feed(fig, records) -> str:
    rows = []
    for rec in records:
        r = rec["results"]
        nodes = r["nodes"]
        cluster = "1 node, 2 CPUs" if nodes == 1 else f"{nodes} simulated nodes, 1 CPU each"
        for n, key in enumerate(k for k in r if k.startswith("workers")):
            workers, feed = key[len("workers"):].split("_", 1)
            workers, row = int(workers), r[key]
            premade = r.get(f"workers{workers}_premade", {}).get("images_per_s")
            first = feed == "premade" or n == 0   # a group of feeds per worker count
            who = ("0 (local mode, the trainer uses both cores)" if workers == 0 else
                   f"{workers} ({row['train_cpus'] / workers:.1f})")
            rows.append([cluster if first else "", who if first else "", feed, f"{row['images_per_s']:.1f}",
                         f"{row['images_per_s'] / premade:.2f}" if premade else "-", f"{row['data_cpus']:.2f}"])
    return table(["cluster", "Train workers (CPU each)", "feed", "images/s", "vs premade", "Ray Data's mean CPUs"],
                 rows)


# ---- docs/search.md: the search replay --------------------------------------------------------------------------
REPLAY, REPLAY_C4 = "docs/bench/search_replay.json", "docs/bench/search_replay_c4.json"
SEARCHERS = {"random": "random, no early stopping", "random+asha": "random + ASHA ({grace})",
             "tpe": "TPE, no early stopping", "tpe+asha": "**TPE + ASHA, the main job ({grace}, the default)**",
             "cmaes+asha": "CMA-ES + ASHA (Optuna's `CmaEsSampler`, from the same point; K sampled at random)"}


def searcher_label(name: str, summary: dict) -> str:
    epochs = summary.get("trial_epochs")
    grace = f"grace {epochs // 2} = half the epochs" if epochs else "grace: half the epochs"
    if name in SEARCHERS:
        return SEARCHERS[name].format(grace=grace)
    g, r = (int(x[1:]) for x in name.split()[1:])   # "tpe+asha g25 r2"
    return f"TPE + ASHA, grace {g}" + (f", reduction factor {r}" if r != 2 else "") + \
        (" (the old default)" if g == 2 else "")


def searcher_order(name: str) -> tuple:
    """The plain searchers as the replay lists them, then the grace-period variants, longest grace first."""
    return (1, -int(name.split()[1][1:])) if " " in name else (0, 0)


def timed(record: dict) -> bool:
    """Whether a replay record has each searcher's wall time to the target."""
    return all("median_seconds_to_target" in m for m in record["results"]["methods"].values())


def replay_lacks(fig, records) -> list[str]:
    return [f"wall time to the target (`median_seconds_to_target`) in {path}"
            for path, rec in zip(fig.records, records) if not timed(rec)]


def search_replay(fig, records) -> str:
    out = []
    for path, rec in zip(fig.records, records):
        s = rec["results"]
        target, budget, methods = s["target"], s["budget_epochs"], s["methods"]
        rand = methods["random"]
        walls = timed(rec)
        rows = []
        for name in sorted(methods, key=searcher_order):
            m = methods[name]
            epochs = m["median_epochs_to_target"]
            wall = [("never" if not math.isfinite(m["median_seconds_to_target"]) else
                     f"{m['median_seconds_to_target'] / 60:.1f} min"),
                    over(m["median_seconds_to_target"], rand["median_seconds_to_target"])] if walls else \
                ["not recorded", "-"]
            rows.append([searcher_label(name, s), count(epochs) + ("" if math.isfinite(epochs) else " (median)"),
                         ratio(m["ratio_to_budget"]), over(epochs, rand["median_epochs_to_target"]), *wall,
                         f"{m['reached']}/{s['seeds']}", f"{m['chosen_plateau_at_budget_median']:.1f}"])
        at_a_time = "one trial at a time" if s["concurrency"] == 1 else f"{s['concurrency']} trials at a time"
        out += [f"**{at_a_time.capitalize()}** (`--concurrency {s['concurrency']}`, {fig.link(path)}):", "",
                table([f"searcher ({at_a_time})", f"trial-epochs to {target:.1f}", f"vs random's budget ({budget:,})",
                       f"vs random's own trial-epochs to {target:.1f} ({count(rand['median_epochs_to_target'])})",
                       f"wall time to {target:.1f}", "vs random's wall time to it", "reached", "chosen plateau"], rows),
                ""]
    missing = [path for path, rec in zip(fig.records, records) if not timed(rec)]
    if missing:
        out += [(f"**Wall time is not in {' and '.join(f'`{os.path.relpath(p, Path(fig.doc).parent)}`' for p in missing)}**: "
                 "they were made before `bench/search_replay.py` clocked its replays with each configuration's "
                 "measured epoch times (the table's `seconds`). Re-running the commands above adds it; until then "
                 "only trial-epochs are measured."), ""]
    return "\n".join(out)


def search_rho(fig, records) -> str:
    c = records[0]["results"]["correlations"]
    epochs = [int(k[len("knn_epoch"):-len("_vs_plateau")]) for k in c if k.startswith("knn_epoch")]
    return table(["epoch", *map(str, epochs)],
                 [["rho with the plateau", *(interval(c[f"knn_epoch{e}_vs_plateau"]) for e in epochs)]])


SIGNALS = {"teacher": "the teacher's own best k-NN (stage 1's objective, as the main job measures it)",
           "table_best": "the configuration's best k-NN in the table (another run)",
           "table_plateau": "the configuration's k-NN plateau in the table (mean of its last 10 epochs)",
           "final": "the student's final val (what stage 2 and the joint step choose by)",
           "proxy10": "the student's val at epochs 6-10", "proxy20": "the student's val at epochs 16-20",
           "proxy30": "the student's val at epochs 26-30"}


def search_signals(fig, records) -> str:
    c = records[0]["results"]["correlations"]
    n = min(8, c["tested_pairs"])
    return table(["signal (stage 1 or stage 2)", "rho with the student's test top-1",
                  f"pick of {n}: test points gained over a random pick"],
                 [[label, interval(c[f"{key}_vs_student_test"]), interval(c[f"pick_of_{n}_by_{key}_gain_test"], "+")]
                  for key, label in SIGNALS.items() if f"{key}_vs_student_test" in c])


def search_joint(fig, records) -> str:
    c = records[0]["results"]["correlations"]
    n, rows = 8, []
    for top in range(1, 5):
        key = f"of_{n}_top{top}_then_val_on"
        if f"{key}_val" not in c:
            continue
        rows.append(["1 (k-NN alone: the default)" if top == 1 else str(top), interval(c[f"{key}_val"], "+"),
                     interval(c[f"{key}_test"], "+"), interval(c[f"{key}_test_vs_top1"], "+") if top > 1 else "-"])
    return table([f"teachers stage 2 chooses among (of {n} candidates)",
                  "student points over a random pick, on val (where it chose)", "on test (held out)",
                  "on test, over k-NN's first alone"], rows)


def cluster_startup(fig, records) -> str:
    r = records[0]["results"]
    warm = r["warm_first_epoch_line_s"]
    rows = [["cold (the GPU node launched by the autoscaler)", f"{r['cold']['to_running_s']:.1f}",
             f"{r['cold']['to_first_line_s']:.1f}", f"{r['cold']['to_first_epoch_line_s']:.1f}",
             f"{r['cold']['to_end_s']:.1f}"]]
    rows += [[f"warm, run {i + 1}", f"{w['to_running_s']:.1f}", f"{w['to_first_line_s']:.1f}",
              f"{w['to_first_epoch_line_s']:.1f}", f"{w['to_end_s']:.1f}"] for i, w in enumerate(r["warm"])]
    out = [table(["phase-1 job (1 epoch)", "to RUNNING (s)", "to its first line (s)", "to the first epoch line (s)",
                  "to its end (s)"], rows),
           "", (f"Warm: first epoch line after median {warm['median']:.1f} s ({warm['min']:.1f}-{warm['max']:.1f}, "
                f"{len(warm['each'])} runs)."), ""]
    if "scaling" in r:
        sc = r["scaling"]
        out += [table(["Train workers (each on its own GPU node)", "nodes", "images/s (epochs after the first)",
                       "job wall (s)"],
                      [[str(n), str(sc[str(n)]["nodes"]), rate(sc[str(n)]["images_per_s"]), f"{sc[str(n)]['wall_s']:.0f}"]
                       for n in (1, 2)]),
                "", (f"2 workers vs 1: **{sc['ratio_2_vs_1']:.2f}x** the images/s ({r['images']} images, {r['epochs']} "
                     f"epochs).")]
    return "\n".join(out)


BENCH = "docs/benchmarks.md"
SEARCH = "docs/search.md"
FIGURES = [
    Figure("data_path", BENCH, ("docs/bench/data_path.json", "docs/bench/data_path_demo5000.json"),
           ("python bench/data_path.py --workers 2 --epochs 3 --resolution 64",
            ("python bench/data_path.py --workers 2 --epochs 3 --resolution 64 --demo-per-class 500 "
             "--out docs/bench/data_path_demo5000.json")), data_path),
    Figure("trainer_overhead", BENCH, ("docs/bench/trainer_overhead.json",),
           ("python bench/trainer_overhead.py --epochs 4 --images-per-class 20",), trainer_overhead),
    Figure("stem_stride", BENCH, ("docs/bench/stem_stride.json",), ("python bench/stem_stride.py --steps 8",),
           stem_stride),
    Figure("runtime_env_hook", BENCH, ("docs/bench/runtime_env_hook.json",), ("python bench/runtime_env_hook.py",),
           runtime_env_hook),
    Figure("augment", BENCH, ("docs/bench/augment.json",),
           ("python bench/augment.py --sizes 32 64 224 --images 256 --repeats 3",), augment),
    Figure("phase1_views", BENCH, ("docs/bench/phase1_views.json",), ("python bench/phase1_views.py --epochs 4",),
           phase1_views),
    Figure("gpu_phases", BENCH, ("docs/bench/gpu_phases.json",), ("python bench/gpu_phases.py --seconds 8",),
           gpu_phases),
    Figure("gpu_phases_compile", BENCH, ("docs/bench/gpu_phases_tiny.json",),
           ("python bench/gpu_phases.py --tiny --out docs/bench/gpu_phases_tiny.json",), gpu_phases_compile),
    Figure("phase1_feed", BENCH, ("docs/bench/phase1_feed.json", "docs/bench/phase1_feed_2nodes.json"),
           ("python bench/phase1_feed.py --epochs 4 --workers 0 1",
            "python bench/phase1_feed.py --epochs 4 --workers 2 --nodes 2 --out docs/bench/phase1_feed_2nodes.json"),
           phase1_feed),
    Figure("cluster_startup", BENCH, ("docs/bench/cluster_startup.json",), ("python bench/cluster_startup.py",),
           cluster_startup),
    Figure("search_rho", SEARCH, (REPLAY,), ("python bench/search_replay.py --seeds 20 --grace-periods 2 10 25",),
           search_rho, brief=True),
    Figure("search_replay", SEARCH, (REPLAY, REPLAY_C4),
           ("python bench/search_replay.py --seeds 20 --grace-periods 2 10 25",
            f"python bench/search_replay.py --seeds 20 --concurrency 4 --grace-periods 2 --out {REPLAY_C4} --plot ''"),
           search_replay, lacks=replay_lacks),
    Figure("search_signals", SEARCH, (REPLAY,), ("python bench/search_replay.py --seeds 20 --grace-periods 2 10 25",),
           search_signals, brief=True),
    Figure("search_joint", SEARCH, (REPLAY,), ("python bench/search_replay.py --seeds 20 --grace-periods 2 10 25",),
           search_joint, brief=True),
]
