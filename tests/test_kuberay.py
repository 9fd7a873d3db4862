"""deploy/kuberay/rayjob.yaml (a RayJob with its RayCluster) agrees with cluster.yaml: the same Ray
version and base image, the same lock, the head's resources and driver resource, one autoscaled
worker group per node type with its resources and 0..max_workers replicas, token auth, S3 from the
pod's identity. Each check is shown to fail on a broken copy. No Kubernetes here: structure only."""
import copy
import json
import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml

from raypipe.cluster import DRIVER_RESOURCE

REPO = Path(__file__).resolve().parents[1]
CLUSTER = yaml.safe_load((REPO / "cluster.yaml").read_text())
DOCS = list(yaml.safe_load_all((REPO / "deploy" / "kuberay" / "rayjob.yaml").read_text()))
DOCKERFILE = (REPO / "deploy" / "kuberay" / "Dockerfile").read_text()


def pod_templates(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


def problems(docs: list[dict], dockerfile: str) -> list[str]:
    found = []
    job = next(d for d in docs if d["kind"] == "RayJob")
    account = next((d for d in docs if d["kind"] == "ServiceAccount"), None)
    spec, types = job["spec"]["rayClusterSpec"], CLUSTER["available_node_types"]
    if spec.get("rayVersion") != ray.__version__ or f":{ray.__version__}-" not in CLUSTER["docker"]["image"]:
        found.append(f"rayVersion {spec.get('rayVersion')} is not the installed Ray {ray.__version__}")
    base = re.search(r"^FROM (\S+)", dockerfile, re.M)
    if not base or base.group(1) != CLUSTER["docker"]["image"]:
        found.append("the Dockerfile's base image is not cluster.yaml's docker.image")
    if "-c /home/ray/raypipe/requirements/cluster.lock" not in dockerfile:
        found.append("the Dockerfile does not install with requirements/cluster.lock")
    images = {c["image"] for t in pod_templates(spec) for c in t["spec"]["containers"]}
    if len(images) != 1:
        found.append(f"pods run different images: {sorted(images)}")
    if spec.get("authOptions", {}).get("mode") != "token":
        found.append("token authentication is off")
    if not spec.get("enableInTreeAutoscaling"):
        found.append("the autoscaler is off")
    head, head_type = spec["headGroupSpec"], types[CLUSTER["head_node_type"]]["resources"]
    params = head["rayStartParams"]
    if float(params.get("num-gpus", -1)) != head_type["GPU"] or float(params.get("num-cpus", -1)) != head_type["CPU"]:
        found.append("the head's CPU/GPU differ from cluster.yaml's head")
    custom = json.loads(json.loads(params.get("resources", '"{}"')))
    if custom.get(DRIVER_RESOURCE) != head_type.get(DRIVER_RESOURCE):
        found.append(f"the head does not carry {DRIVER_RESOURCE}")
    groups = {g["groupName"].replace("-", "_"): g for g in spec["workerGroupSpecs"]}
    workers = {n: t for n, t in types.items() if n != CLUSTER["head_node_type"]}
    if set(groups) != set(workers):
        found.append(f"worker groups {sorted(groups)} are not cluster.yaml's node types {sorted(workers)}")
    for name, t in workers.items():
        g = groups.get(name)
        if g is None:
            continue
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        if (float(limits.get("cpu", 0)), float(limits.get("nvidia.com/gpu", 0))) != (t["resources"]["CPU"],
                                                                                    t["resources"].get("GPU", 0)):
            found.append(f"{name}: CPU/GPU differ from cluster.yaml")
        if (g.get("minReplicas"), g.get("maxReplicas")) != (t.get("min_workers", 0), t["max_workers"]):
            found.append(f"{name}: replicas {g.get('minReplicas')}..{g.get('maxReplicas')} are not "
                         f"{t.get('min_workers', 0)}..{t['max_workers']}")
    if not account or "role-arn" not in " ".join(account["metadata"].get("annotations", {})):
        found.append("no service account with a cloud role: S3 must come from the pod's identity")
    if any(t["spec"].get("serviceAccountName") != (account or {}).get("metadata", {}).get("name")
           for t in pod_templates(spec)):
        found.append("a pod does not run as the service account")
    text = yaml.safe_dump_all(docs)
    if re.search(r"AWS_SECRET_ACCESS_KEY|aws_secret|AKIA[0-9A-Z]{16}", text):
        found.append("credentials in the manifest")
    if 'RAYPIPE_AUTOSCALING: "1"' not in job["spec"].get("runtimeEnvYAML", ""):
        found.append("the job does not run with RAYPIPE_AUTOSCALING=1")
    return found


def test_rayjob_agrees_with_cluster_yaml():
    assert problems(DOCS, DOCKERFILE) == []


def test_rayjob_runs_the_main_job_with_documented_flags():
    from raypipe.tune import parse_args
    job = next(d for d in DOCS if d["kind"] == "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "/home/ray/raypipe/experiments/tune_margin.py"]
    args = parse_args(argv[2:])
    assert args.data.startswith("s3://") and args.storage.startswith("s3://") and args.max_concurrent_trials
    assert "resources.use_gpu=true" in args.overrides   # no launcher config on Kubernetes to infer GPUs from
    assert (REPO / args.config.removeprefix("/home/ray/raypipe/")).is_file()


def _set(path: str, value):
    def mutate(docs):
        node = next(d for d in docs if d["kind"] == "RayJob")["spec"]["rayClusterSpec"]
        *parts, last = path.split(".")
        for p in parts:
            node = node[int(p)] if p.isdigit() else node[p]
        node[last] = value
    return mutate


@pytest.mark.parametrize("mutate, expected", [
    (_set("rayVersion", "2.59.0"), "rayVersion"),
    (_set("authOptions.mode", "disabled"), "token"),
    (_set("enableInTreeAutoscaling", False), "autoscaler"),
    (_set("headGroupSpec.rayStartParams.num-gpus", "1"), "head's CPU/GPU"),
    (_set("headGroupSpec.rayStartParams.resources", '"{}"'), DRIVER_RESOURCE),
    (_set("workerGroupSpecs.0.maxReplicas", 16), "replicas"),
    (_set("workerGroupSpecs.1.template.spec.containers.0.resources.limits", {"cpu": "48", "nvidia.com/gpu": "8"}),
     "CPU/GPU differ"),
    (_set("workerGroupSpecs.0.template.spec.containers.0.image", "other:latest"), "different images"),
    (_set("workerGroupSpecs.0.template.spec.serviceAccountName", "default"), "service account"),
    (lambda docs: docs.pop(0), "service account with a cloud role"),
])
def test_each_agreement_check_can_fail(mutate, expected):
    docs = copy.deepcopy(DOCS)
    mutate(docs)
    assert any(expected in p for p in problems(docs, DOCKERFILE)), problems(docs, DOCKERFILE)


def test_dockerfile_checks_can_fail():
    other_base = re.sub(r"^FROM \S+", "FROM rayproject/ray:2.60.0-py311-cpu", DOCKERFILE, flags=re.M)
    assert any("base image" in p for p in problems(DOCS, other_base))
    unlocked = DOCKERFILE.replace("-c /home/ray/raypipe/requirements/cluster.lock ", "")
    assert any("cluster.lock" in p for p in problems(DOCS, unlocked))
