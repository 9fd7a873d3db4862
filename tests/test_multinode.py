"""Multi-node behaviour on a simulated cluster: a head and two worker "nodes" on this machine
(ray.cluster_utils.Cluster), shared storage in a folder, Train workers forced onto different
nodes with STRICT_SPREAD."""
import io
import json
from pathlib import Path

import pytest

from test_teacher import _queue_probe


pytestmark = pytest.mark.e2e   # (conftest runs these tests last: they stop the session's local cluster)


@pytest.fixture(scope="module")
def three_nodes():
    import ray
    from ray.cluster_utils import Cluster

    from raypipe.cluster import ensure_ray
    ray.shutdown()   # never two Ray clusters on one host: stop the session's local one, if any
    # the head carries the drivers' custom resource, as in cluster.yaml
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"raypipe_driver": 1}})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ensure_ray(address=cluster.address, runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).parent)}})
    yield cluster, nodes
    ray.shutdown()
    cluster.shutdown()


def test_queue_keys_from_workers_on_two_nodes(three_nodes, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    result = TorchTrainer(_queue_probe, scaling_config=ScalingConfig(
        num_workers=2, resources_per_worker={"CPU": 0.5}, placement_strategy="STRICT_SPREAD"),
        run_config=RunConfig(name="probe", storage_path=str(tmp_path))).fit()
    m = result.return_value
    assert m["queues_equal"] and m["queue_values"] == [1.0, 1.0, 2.0, 2.0] and m["shuffle_ok"]


@pytest.mark.timeout(1200)
def test_phase1_and_a_tune_trial_across_nodes_then_the_nodes_go_away(three_nodes, tiny_config, tmp_path,
                                                                       s3_server):
    """Phase 1 on two nodes with checkpoints in S3; a node that hosts a worker is removed mid-run and
    the run resumes from storage on the nodes left. Then a Tune trial, whose nodes are removed
    afterwards: nothing of it is lost."""
    import threading
    import time

    import pandas as pd
    from ray.util.state import list_actors

    from raypipe import storage
    from raypipe.storage import Outputs
    from raypipe.phase import pretrain
    from raypipe.tune import stage1
    cluster, workers = three_nodes
    head = cluster.head_node.node_id
    runs = f"{s3_server}/multinode/runs"
    cfg = tiny_config("name=mn", "resources.num_workers=2", "resources.placement_strategy=STRICT_SPREAD",
                      f"output_dir={runs}", "teacher.moco.queue_size=32", "teacher.epochs=3",
                      "resources.max_failures=1")
    out = {}
    runner = threading.Thread(target=lambda: out.update(final=pretrain(cfg)), daemon=True)
    runner.start()
    deadline = time.time() + 300
    snapshot = f"{runs}/mn/train/checkpoint_manager_snapshot.json"   # once Train registered a checkpoint
    while not (storage.is_file(snapshot) and "checkpoint_" in storage.read_text(snapshot)):
        assert time.time() < deadline and runner.is_alive(), "no checkpoint was written"
        time.sleep(0.5)
    hosts = {a.node_id for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
                                            detail=True)}
    (doomed,) = [n for n in workers if n.node_id in hosts][:1]
    cluster.remove_node(doomed)                                   # its node goes away mid-run
    runner.join(timeout=400)
    assert "final" in out, "the run did not finish after its node was removed"
    history = pd.read_csv(io.StringIO(storage.read_text(f"{runs}/mn/metrics.csv")))   # every file of the run in S3
    assert history["epoch"].tolist() == [0, 1, 2] and history["start_epoch"].max() > 0   # resumed, none lost
    assert out["final"]["nodes"] == 2 and out["final"]["world_size"] == 2
    assert out["final"]["checkpoint"].startswith(f"{runs}/mn/train/")

    # a Tune trial across both worker nodes, everything in the (S3) storage; then the nodes go away
    tcfg = cfg.with_overrides({"tune.teacher_trials": 1, "teacher.epochs": 1})
    exp = f"{s3_server}/multinode/exp"
    record = stage1(tcfg, {"storage": exp}, Outputs(exp), 64, ["circle", "square", "star", "stripes"])
    drivers = list_actors(filters=[("class_name", "=", "ImplicitFunc")], detail=True)
    assert drivers and {a.node_id for a in drivers} == {head}, "trial drivers belong on the driver node type"
    for node in workers:
        if node is not doomed:
            cluster.remove_node(node)
    (trial,) = [n for n, is_dir in storage.list_dir(f"{exp}/stage1_teacher_runs") if is_dir]
    run = f"{exp}/stage1_teacher_runs/{trial}"
    assert any(n.startswith("checkpoint_") for n, _ in storage.list_dir(f"{run}/train"))
    assert {"metrics.csv", "tensorboard", "data_report.json", "config.yaml"} <= {n for n, _ in storage.list_dir(run)}
    (tune_dir,) = [n for n, is_dir in storage.list_dir(f"{exp}/stage1_teacher") if is_dir]
    rows = [json.loads(line) for line in storage.read_text(f"{exp}/stage1_teacher/{tune_dir}/result.json").splitlines()]
    assert rows[-1]["nodes"] == 2 and storage.is_file(record["teacher"]) and record["teacher"].startswith(exp)
