"""Preflight against the node types an autoscaling cluster can launch (cluster.yaml's
``available_node_types``): a bundle no node type can hold, or more trials' workers than
``max_workers`` nodes can hold, is one error naming the key to change - before Ray is asked for
anything (no Ray here)."""
import copy
from pathlib import Path

import pytest
import yaml

from raypipe.cluster import check_node_types
from raypipe.config import load_config
from raypipe.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CLUSTER = yaml.safe_load((REPO / "cluster.yaml").read_text())
VIPRIORS = REPO / "experiments" / "configs" / "vipriors_resnet50.yaml"


def check(cluster, concurrency=4, *overrides):
    cfg = load_config(VIPRIORS, ["data.root=/d", *overrides])
    check_node_types(cfg, concurrency, cluster, "cluster.yaml")


def test_the_documented_job_fits_cluster_yaml():
    check(CLUSTER, 4)                                    # docs/cluster.md: --max-concurrent-trials 4
    check(CLUSTER, 1, "resources.gpus_per_worker=4")     # a whole gpu_4x node per worker


@pytest.mark.parametrize("overrides, concurrency, mutate, words", [
    (["resources.gpus_per_worker=8"], 1, None, ["a Train worker", "resources.gpus_per_worker", "GPU"]),
    (["data.cpus_per_task=64"], 1, None, ["a Ray Data task", "data.cpus_per_task"]),
    (["tune.driver_cpus=1"], 1, lambda c: c["available_node_types"]["head"]["resources"].update(CPU=0),
     ["a trial's driver", "tune.driver_cpus", "raypipe_driver"]),
    # a mutated node type: the 4-GPU type gone, so 4 trials x 4 workers need 16 single-GPU nodes > max_workers 8
    ([], 4, lambda c: c["available_node_types"].pop("gpu_4x"), ["tune.max_concurrent_trials", "max_workers=8"]),
    ([], 3, lambda c: c.update(max_workers=2), ["tune.max_concurrent_trials", "max_workers=2"]),
])
def test_a_bundle_or_concurrency_no_node_type_can_hold_names_the_key(overrides, concurrency, mutate, words):
    cluster = copy.deepcopy(CLUSTER)
    if mutate:
        mutate(cluster)
    with pytest.raises(ConfigError) as err:
        check(cluster, concurrency, *overrides)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_cpu_only_training_is_checked_against_cpus():
    cluster = copy.deepcopy(CLUSTER)
    check(cluster, 1, "resources.use_gpu=false", "resources.cpus_per_worker=8")
    with pytest.raises(ConfigError, match="resources.cpus_per_worker"):
        check(cluster, 1, "resources.use_gpu=false", "resources.cpus_per_worker=49")
