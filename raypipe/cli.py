"""The ``raypipe`` command: one subcommand per job. Configs are validated before Ray starts."""
from __future__ import annotations

import argparse
import json
import sys

import yaml

from .config import load_config, parse_args_with_overrides, parse_overrides
from .console import set_verbose
from .errors import USER_ERRORS, ConfigError
from .settings import AVERAGES, PROBE_LRS

# torch, Ray and the phase modules are imported by the commands that use them: `--help` stays fast.


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (e.g. experiments/configs/demo.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. teacher.epochs=5")
    p.add_argument("--verbose", action="store_true", help="also print Ray's own logs (INFO and up)")


def _load(args, flags: dict | None = None):
    """The config file + the command's flags (typed values at dotted keys, never re-parsed) + the
    ``key=value`` overrides, which win."""
    typed = {"data.root": args.data} if getattr(args, "data", None) else {}
    typed.update({k: v for k, v in (flags or {}).items() if v is not None})
    return load_config(args.config, {**typed, **parse_overrides(list(args.overrides))})


def cmd_demo_data(args) -> None:
    from .demo import make_demo_data
    counts = make_demo_data(args.out, {"train": args.train, "val": args.val, "test": args.test},
                            size=args.size, seed=args.seed)
    print(f"wrote demo data to {args.out}: {counts}")


def cmd_to_parquet(args) -> None:
    from .data import folder_to_parquet
    counts = folder_to_parquet(args.src, args.dst)
    print(f"wrote Parquet to {args.dst}: {counts}")


def cmd_check_data(args) -> None:
    from .data import scan_dataset
    cfg = _load(args)
    index = scan_dataset(cfg.data, ("train", "val", "test"))
    for name, split in index.items():
        print(f"{name:5s} {len(split):7d} images  {len(split.classes)} classes  labelled={split.labelled}")


def cmd_config(args) -> None:
    if args.keys:
        from .config import describe
        for key, default, doc in describe():
            print(f"{key} = {default!r}" + (f"  # {doc}" if doc else ""))
        return
    cfg = _load(args)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")


def cmd_pretrain(args) -> None:
    from .phase import pretrain
    cfg = _load(args, {"name": args.name})
    final = pretrain(cfg)
    print(json.dumps({k: final[k] for k in ("epochs", "loss", "knn_top1", "best_knn_top1", "teacher",
                                            "skipped_images") if k in final}, indent=2))


def cmd_distill(args) -> None:
    from .phase import train_student
    cfg = _load(args, {"student.mode": args.mode, "name": args.name})
    final = train_student(cfg, args.teacher)
    print(json.dumps({k: final[k] for k in ("phase", "epochs", "val_top1", "best_val_top1", "model",
                                            "skipped_images") if k in final}, indent=2))


def cmd_linear_probe(args) -> None:
    from .evaluate import probe_teacher
    cfg = _load(args)
    from .models import arch_of
    if bool(args.teacher) == args.random_init:
        raise ConfigError("give either --teacher TEACHER.pt or --random-init (the config's teacher backbone, "
                          "random weights: the baseline a teacher's gain is measured against)")
    teacher = args.teacher or arch_of(cfg.teacher)
    scores = probe_teacher(cfg.data, teacher, tuple(args.split), epochs=args.epochs, lrs=tuple(args.lr),
                           knn_k=cfg.teacher.knn_k, knn_t=cfg.teacher.knn_t, seed=cfg.teacher.seed)
    print(json.dumps(scores, indent=2))
    if args.out:
        from . import storage
        storage.write_json(args.out, {"teacher": args.teacher or "random-init", **scores})


def cmd_evaluate(args) -> None:
    from .evaluate import evaluate_models
    cfg = _load(args)
    report = evaluate_models(cfg.data, args.split, args.model, ten_crop=args.ten_crop, weights=args.weights,
                             out_dir=args.out, submission=args.submission, average=args.average)
    short = {k: report[k] for k in ("split", "views", "n_images", "top1", "top5", "submission") if k in report}
    print(json.dumps(short, indent=2))
    print(f"report: {args.out.rstrip('/')}/report.json")


def cmd_export(args) -> None:
    from .export import export_model
    files = export_model(args.model, args.out, onnx=not args.no_onnx)
    for kind, path in files.items():
        print(f"{kind:10s} {path}")


def cmd_results(args) -> None:
    from .results import show_results
    show_results(args.experiment, args.out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raypipe", description="Distilling visual priors from self-supervised "
                                "learning (MoCo v2 + margin, OFD self-distillation) on Ray.")
    p.add_argument("--version", action="version", version=f"raypipe {version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("demo-data", help="write the embedded demo data set (ImageFolder, seconds)")
    s.add_argument("out", help="folder to write the demo data set to")
    s.add_argument("--train", type=int, default=50, help="images per class")
    s.add_argument("--val", type=int, default=20)
    s.add_argument("--test", type=int, default=20)
    s.add_argument("--size", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_demo_data)

    s = sub.add_parser("data", help="data utilities: to-parquet, check")
    dsub = s.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    d = dsub.add_parser("to-parquet", help="convert an image folder to Parquet (image bytes + label + path)")
    d.add_argument("src", help="image-folder data set root (split folders of class folders)")
    d.add_argument("dst", help="output folder for the Parquet files")
    d.set_defaults(fn=cmd_to_parquet)
    d = dsub.add_parser("check", help="index a data set and report its splits (no Ray)")
    d.add_argument("data", help="data set root: split folders (train/ val/ test/) of class folders, or Parquet; local or s3://")
    _config_args(d)
    d.set_defaults(fn=cmd_check_data)

    s = sub.add_parser("config", help="print the resolved, validated config (--keys: every key, its default and meaning)")
    s.add_argument("--keys", action="store_true", help="list every config key with its default and meaning")
    _config_args(s)
    s.set_defaults(fn=cmd_config, data=None)

    s = sub.add_parser("pretrain", help="phase 1: MoCo v2 teacher with the margin loss")
    s.add_argument("data", help="data set root: split folders (train/ val/ test/) of class folders, or Parquet; local or s3://")
    s.add_argument("--name", help="run name (folder under output_dir); re-running it resumes")
    _config_args(s)
    s.set_defaults(fn=cmd_pretrain)

    s = sub.add_parser("distill", help="phase 2: OFD student (or the supervised / fine-tune baselines)")
    s.add_argument("data", help="data set root: split folders (train/ val/ test/) of class folders, or Parquet; local or s3://")
    s.add_argument("--teacher", help="teacher.pt from `raypipe pretrain` (not needed for --mode supervised)")
    s.add_argument("--mode", metavar="MODE",
                   help="overrides student.mode: distill (OFD), finetune, supervised, or a registered distiller")
    s.add_argument("--name")
    _config_args(s)
    s.set_defaults(fn=cmd_distill)

    s = sub.add_parser("linear-probe", help="linear classifier on a frozen teacher (MoCo protocol)")
    s.add_argument("data", help="data set root: split folders (train/ val/ test/) of class folders, or Parquet; local or s3://")
    s.add_argument("--teacher", help="teacher.pt from `raypipe pretrain`")
    s.add_argument("--random-init", action="store_true",
                   help="probe the config's teacher backbone with random weights (seed teacher.seed) instead")
    s.add_argument("--split", nargs="+", default=["val"], choices=("val", "test"))
    s.add_argument("--epochs", type=int, default=100)
    s.add_argument("--lr", type=float, nargs="+", default=list(PROBE_LRS),
                   help="learning rates to try; the best on val is kept, and while it is the smallest or largest "
                        "tried, up to 2 more are tried x10 beyond it (default: %(default)s)")
    s.add_argument("--out", help="also write the scores to this JSON file")
    _config_args(s)
    s.set_defaults(fn=cmd_linear_probe)

    s = sub.add_parser("evaluate", help="evaluate a model or an ensemble, optionally with 10-crop")
    s.add_argument("data", help="data set root: split folders (train/ val/ test/) of class folders, or Parquet; local or s3://")
    s.add_argument("--split", default="val", help="val, test or a folder name under DATA")
    s.add_argument("--model", action="append", required=True, help="classifier .pt (repeat for an ensemble)")
    s.add_argument("--weights", type=float, nargs="+", help="ensemble weights, one per --model")
    s.add_argument("--ten-crop", action="store_true")
    s.add_argument("--average", choices=AVERAGES, default="logits",
                   help="what 10-crop views and ensemble members average (default: %(default)s)")
    s.add_argument("--out", default="eval", help="folder for report.json and confusion.png")
    s.add_argument("--submission", help="write the VIPriors CSV (Image IDs,Predictions) here")
    _config_args(s)
    s.set_defaults(fn=cmd_evaluate)

    s = sub.add_parser("export", help="a model file -> plain torchvision state_dict, ONNX classifier, JSON card")
    s.add_argument("model", help="student.pt / teacher.pt written by raypipe (local path or URI)")
    s.add_argument("--out", default="export", help="output folder (default: %(default)s)")
    s.add_argument("--no-onnx", action="store_true", help="skip the ONNX file (it needs: pip install 'raypipe[export]')")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("results", help="leaderboards, best configs and plots of a tune_margin experiment")
    s.add_argument("experiment", help="experiment folder written by experiments/tune_margin.py (e.g. runs/tune_margin)")
    s.add_argument("--out", help="folder for the PNG plots (default EXPERIMENT/plots)")
    s.set_defaults(fn=cmd_results)

    sub.add_parser("tune", help="the main job (same as experiments/tune_margin.py; `raypipe tune --help`)")
    return p


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version
    try:
        return dist_version("raypipe")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["tune"]:  # hand every remaining argument (--help included) to the main job
        from .tune import cli_main
        return cli_main(argv[1:])
    args = parse_args_with_overrides(build_parser(), argv)
    if getattr(args, "verbose", False):
        set_verbose(True)
    try:
        args.fn(args)
    except USER_ERRORS as exc:
        print(f"raypipe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
