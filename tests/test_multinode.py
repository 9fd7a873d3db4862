"""Multi-node behaviour on a simulated cluster: a head and two worker "nodes" on this machine
(ray.cluster_utils.Cluster), shared storage in a folder, Train workers forced onto different
nodes with STRICT_SPREAD."""
import json
from pathlib import Path

import pytest

from test_teacher import _queue_probe


@pytest.fixture(scope="module")
def three_nodes(ray_cluster):
    import ray
    from ray.cluster_utils import Cluster

    from raypipe.engine import ensure_ray
    ray.shutdown()   # never two Ray clusters on one host: park the session's local one
    # the head carries the drivers' custom resource, as in cluster.yaml
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"raypipe_driver": 1}})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ensure_ray(address=cluster.address, runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).parent)}})
    yield cluster, nodes
    ray.shutdown()
    cluster.shutdown()
    ensure_ray(num_cpus=2, runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).parent)}})


def test_queue_keys_from_workers_on_two_nodes(three_nodes, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    result = TorchTrainer(_queue_probe, scaling_config=ScalingConfig(
        num_workers=2, resources_per_worker={"CPU": 0.5}, placement_strategy="STRICT_SPREAD"),
        run_config=RunConfig(name="probe", storage_path=str(tmp_path))).fit()
    m = result.return_value
    assert m["queues_equal"] and m["queue_values"] == [1.0, 1.0, 2.0, 2.0] and m["shuffle_ok"]


@pytest.mark.slow
def test_phase1_and_a_tune_trial_across_nodes(three_nodes, tiny_config, tmp_path):
    from raypipe.teacher import pretrain
    from ray.util.state import list_actors

    from raypipe.storage import Outputs
    from raypipe.tune import stage1
    shared = tmp_path / "shared"
    cfg = tiny_config("name=mn", "resources.num_workers=2", "resources.placement_strategy=STRICT_SPREAD",
                      f"resources.storage_path={shared}", "teacher.queue_size=32")
    final = pretrain(cfg)
    assert final["nodes"] == 2 and final["world_size"] == 2
    assert sorted(p.name for p in (shared / "mn" / "train").glob("checkpoint_*")), "no checkpoint in storage"
    assert final["checkpoint"].startswith(str(shared))

    tcfg = cfg.with_overrides({"tune.teacher_trials": 1, "resources.storage_path": ""})
    record = stage1(tcfg, {"storage": str(shared / "exp")}, Outputs(str(shared / "exp")), 64,
                    ["circle", "square", "star", "stripes"])
    trial_runs = list((shared / "exp" / "stage1_teacher_runs").glob("*/train/checkpoint_*"))
    assert trial_runs, "the trial's Train checkpoints must land in the shared storage"
    results = list((shared / "exp" / "stage1_teacher").glob("*/result.json"))
    rows = [json.loads(line) for line in results[0].read_text().splitlines()]
    assert rows[-1]["nodes"] == 2 and Path(record["teacher"]).is_file()
    head = three_nodes[0].head_node.node_id
    drivers = list_actors(filters=[("class_name", "=", "ImplicitFunc")], detail=True)
    assert drivers and {a.node_id for a in drivers} == {head}, "trial drivers belong on the driver node type"
