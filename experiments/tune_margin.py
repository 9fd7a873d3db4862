"""The main job: search the teacher's margin/temperature/queue and the student's lambda with
Ray Tune + Optuna, train the final students and the ensemble, evaluate on test.

Laptop (local Ray, embedded demo data):   python experiments/tune_margin.py --smoke
Cluster:  ray submit cluster.yaml experiments/tune_margin.py -- --data /mnt/data --storage s3://bucket/raypipe

This file is self-contained on purpose: `ray submit` copies only it to the head node, where
the installed `raypipe` package does the work. Run with --help for all options.
"""
import sys

from raypipe.tune import cli_main

if __name__ == "__main__":
    sys.exit(cli_main())
