"""cluster.yaml: Ray's own launcher validation (offline) plus the properties raypipe relies on.

No Ray runtime and no cloud call: ``prepare_config`` only merges the provider's bundled
``defaults.yaml`` (for aws it imports no boto3 and contacts nothing; ``ray up`` does the
cloud part later, in ``bootstrap_config``), and ``validate_config`` checks the result against
``ray/autoscaler/ray-schema.json`` (unknown keys rejected) and the head/min-max rules. Both
are private Ray APIs: ray is pinned (<2.61) and this test is what notices if they move.

Every check below has a twin that feeds it a broken copy of the config and expects it to
complain, so none of them can pass vacuously.
"""
from __future__ import annotations

import copy
import re
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
CLUSTER_DOC = REPO / "docs" / "cluster.md"
SECRET_PATTERNS = [
    r"AKIA[0-9A-Z]{16}",                        # AWS access key id
    r"ASIA[0-9A-Z]{16}",                        # AWS temporary access key id
    r"(?i)aws_secret",                          # aws_secret_access_key = ...
    r"(?i)aws_access_key_id",
    r"(?i)aws_session_token",
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    r"(?i)\"type\"\s*:\s*\"service_account\"",  # a pasted GCP key file
]


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def ray_validate(cfg: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


# ---- Ray's own validation ----------------------------------------------------------
def test_ray_accepts_the_config_offline(raw):
    before = set(sys.modules)
    prepared = ray_validate(raw)
    cloud = sorted(m for m in set(sys.modules) - before if m.split(".")[0] in ("boto3", "botocore", "googleapiclient"))
    assert not cloud, f"offline validation imported cloud SDKs: {cloud}"
    assert prepared["head_node_type"] == "head"
    # prepare_config fills the head type's max_workers (0) and keeps ours for the GPU types
    assert prepared["available_node_types"]["head"]["max_workers"] == 0


def _set(path: str, value):
    def mutate(cfg: dict) -> None:
        *parents, last = path.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[last] = value
    return mutate


def _min_over_global_max(cfg: dict) -> None:
    cfg["max_workers"] = 0
    cfg["available_node_types"]["gpu_1x"]["min_workers"] = 1


@pytest.mark.parametrize("mutate, message", [
    (_set("bogus_top_level_key", 1), "'bogus_top_level_key' was unexpected"),
    (_set("available_node_types.gpu_1x.bogus_key", 1), "'bogus_key' was unexpected"),
    (_set("docker.bogus_docker_option", True), "'bogus_docker_option' was unexpected"),
    (_set("available_node_types.gpu_1x.resources.GPU", 1.5), "1.5 is not of type 'integer'"),
    (_set("available_node_types.gpu_4x.min_workers", "0"), "'0' is not of type 'integer'"),
    (_set("head_node_type", "no_such_type"), "must be one of `available_node_types`"),
    (_set("max_workers", -1), "less than the minimum of 0"),
    (_min_over_global_max, "smaller than the sum of `min_workers`"),
], ids=["top-level", "node-type", "docker", "float-resource", "str-min-workers", "head-type", "negative-max",
        "min-over-max"])
def test_ray_rejects_broken_copies(raw, mutate, message):
    import jsonschema

    cfg = copy.deepcopy(raw)
    mutate(cfg)
    with pytest.raises((jsonschema.ValidationError, ValueError), match=re.escape(message)):
        ray_validate(cfg)


def test_on_premise_recipe_from_the_comments_validates(raw):
    """The comment says: provider type local + head_ip/worker_ips, drop the node types."""
    cfg = copy.deepcopy(raw)
    cfg["provider"] = {"type": "local", "head_ip": "10.0.0.1", "worker_ips": ["10.0.0.2", "10.0.0.3"]}
    cfg["auth"] = {"ssh_user": "ubuntu", "ssh_private_key": "~/.ssh/id_rsa"}
    del cfg["available_node_types"], cfg["head_node_type"]
    prepared = ray_validate(cfg)
    (node_type,) = prepared["available_node_types"].values()
    assert node_type["max_workers"] == 2


# ---- what raypipe needs from the cluster ------------------------------------------
def project_problems(cfg: dict, text: str, lock_text: str | None = None) -> list[str]:
    """Everything wrong with a cluster config for raypipe (empty list: fine)."""
    import ray

    problems = []
    types = cfg.get("available_node_types", {})
    for name, t in types.items():
        for res, v in t.get("resources", {}).items():
            if not isinstance(v, int) or isinstance(v, bool):
                problems.append(f"{name}: resource {res}={v!r} is not an integer")
    head = cfg.get("head_node_type")
    if head not in types:
        problems.append(f"head_node_type {head!r} is not one of {sorted(types)}")
    elif types[head].get("resources", {}).get("GPU") != 0:
        problems.append("the head must advertise GPU: 0 (no training worker on the head)")
    gpu_types = [n for n, t in types.items() if n != head and t.get("resources", {}).get("GPU", 0) > 0]
    if not gpu_types:
        problems.append("no GPU worker node type")
    for n in gpu_types:
        if types[n].get("min_workers", 0) != 0:
            problems.append(f"{n}: min_workers must be 0 (GPU nodes autoscale from zero)")
        if types[n].get("max_workers", 0) < 1:
            problems.append(f"{n}: max_workers must be >= 1")

    # the repository is mounted, and the mounted copy is what setup_commands install
    mounts = cfg.get("file_mounts", {})
    for dest, src in mounts.items():
        if src.startswith("~"):   # a file of the user's machine (the Ray token), never from the repository
            continue
        if not (REPO / src).exists():
            problems.append(f"file_mounts {dest}: source {src!r} does not exist under {REPO}")
    repo_mounts = [d for d, s in mounts.items() if (REPO / s).resolve() == REPO]
    if not repo_mounts:
        problems.append("no file_mounts entry mounts the repository root")
    installs = [c for c in cfg.get("setup_commands", []) if re.search(r"\bpip install\b", c)]
    if not any(d.rstrip("/") in c.split() for d in repo_mounts for c in installs):
        problems.append(f"setup_commands do not `pip install` the mounted repository {repo_mounts}")
    # ... with the locked versions, which pin this Ray and the project's dependencies
    lock = REPO / "requirements" / "cluster.lock"
    if not any(f"-c {d.rstrip('/')}/requirements/cluster.lock" in c for d in repo_mounts for c in installs):
        problems.append("setup_commands do not install with -c <repository>/requirements/cluster.lock")
    pins = lock_pins(lock.read_text() if lock_text is None else lock_text)
    if pins.get("ray") != ray.__version__:
        problems.append(f"requirements/cluster.lock pins ray {pins.get('ray')}, not {ray.__version__}")
    for dep in project_dependencies():
        if not dep.specifier.contains(pins.get(dep.name.lower(), "0"), prereleases=True):
            problems.append(f"requirements/cluster.lock: {dep.name} {pins.get(dep.name.lower())} is not {dep}")
    excluded = set(cfg.get("rsync_exclude", []))
    for heavy in (".venv", ".git"):
        if heavy not in excluded:
            problems.append(f"rsync_exclude misses {heavy}")

    # the image's Ray is the Ray we test against, and its Python is one the project supports
    docker = cfg.get("docker", {})
    images = [docker[k] for k in ("image", "head_image", "worker_image") if docker.get(k)]
    if not images:
        problems.append("no docker image")
    supported = project_python()
    for image in images:
        tag = image.rsplit(":", 1)[-1]
        if not re.match(rf"{re.escape(ray.__version__)}(-|$)", tag):
            problems.append(f"image {image} is not Ray {ray.__version__}")
        py = re.search(r"-py3(\d+)", tag)
        if py and not supported.contains(f"3.{py.group(1)}"):
            problems.append(f"image {image}: Python 3.{py.group(1)} is outside requires-python {supported}")

    # trial drivers (spawned by the raylet) must see RAYPIPE_AUTOSCALING=1 (cluster.check_cluster_can_fit);
    # every node runs with Ray's token authentication, the token shipped from outside the repository
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in cfg.get(key, []) if "ray start" in c]
        for var in ("RAYPIPE_AUTOSCALING=1", "RAY_AUTH_MODE=token"):
            if not start or not all(re.search(rf"export {var}\s*;", c) for c in start):
                problems.append(f"{key}: `ray start` without `export {var};`")
    if mounts.get("/home/ray/.ray/auth_token") != "~/.ray/auth_token":
        problems.append("file_mounts must ship the local ~/.ray/auth_token to /home/ray/.ray/auth_token")

    # trial drivers are pinned to the head (tune.DRIVER_RESOURCE), never to GPU nodes
    from raypipe.search import DRIVER_RESOURCE
    carriers = sorted(n for n, t in types.items() if t.get("resources", {}).get(DRIVER_RESOURCE))
    if carriers != [head]:
        problems.append(f"only the head may carry {DRIVER_RESOURCE}; it is on {carriers}")

    for pattern in SECRET_PATTERNS:
        if re.search(pattern, text):
            problems.append(f"credential-looking text matches {pattern}")
    return problems


def lock_pins(text: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.strip().lower()] = version.strip() if version else "unpinned"
    return pins


def project_dependencies():
    from packaging.requirements import Requirement
    return [Requirement(d) for d in _pyproject()["project"]["dependencies"]]


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def project_python():
    from packaging.specifiers import SpecifierSet
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return SpecifierSet(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"])


def test_cluster_yaml_fits_raypipe(raw):
    assert project_problems(raw, CLUSTER_YAML.read_text()) == []


def _gpu_min_one(cfg):
    cfg["available_node_types"]["gpu_1x"]["min_workers"] = 1


def _gpu_max_zero(cfg):
    cfg["available_node_types"]["gpu_4x"]["max_workers"] = 0


def _head_gpu(cfg):
    cfg["available_node_types"]["head"]["resources"]["GPU"] = 1


def _head_gpu_missing(cfg):
    del cfg["available_node_types"]["head"]["resources"]["GPU"]


def _float_cpu(cfg):
    cfg["available_node_types"]["gpu_4x"]["resources"]["CPU"] = 47.5


def _bad_head_type(cfg):
    cfg["head_node_type"] = "gpu_head"


def _no_gpu_types(cfg):
    for t in cfg["available_node_types"].values():
        t["resources"]["GPU"] = 0


def _mount_missing_source(cfg):
    cfg["file_mounts"]["/home/ray/data"] = "no_such_folder"


def _install_other_path(cfg):
    cfg["setup_commands"] = [c.replace("/home/ray/raypipe", "/home/ray/elsewhere") for c in cfg["setup_commands"]]


def _no_install(cfg):
    cfg["setup_commands"] = [c for c in cfg["setup_commands"] if "pip install" not in c]


def _mount_elsewhere(cfg):
    cfg["file_mounts"] = {"/home/ray/other": "."}


def _sync_venv(cfg):
    cfg["rsync_exclude"] = [e for e in cfg["rsync_exclude"] if e != ".venv"]


def _old_ray(cfg):
    cfg["docker"]["image"] = "rayproject/ray:2.9.0-py311-gpu"


def _prefix_ray(cfg):  # a moving tag is not a pinned Ray version
    cfg["docker"]["worker_image"] = "rayproject/ray:latest-py311-gpu"


def _old_python(cfg):
    import ray
    cfg["docker"]["head_image"] = f"rayproject/ray:{ray.__version__}-py39-cpu"


def _no_auth(cfg):
    cfg["head_start_ray_commands"] = [c.replace("export RAY_AUTH_MODE=token; ", "")
                                      for c in cfg["head_start_ray_commands"]]


def _no_token_mount(cfg):
    del cfg["file_mounts"]["/home/ray/.ray/auth_token"]


def _drivers_on_gpu(cfg):
    cfg["available_node_types"]["gpu_1x"]["resources"]["raypipe_driver"] = 1


def _no_driver_resource(cfg):
    del cfg["available_node_types"]["head"]["resources"]["raypipe_driver"]


def _unlocked_install(cfg):
    cfg["setup_commands"] = [c.replace("-c /home/ray/raypipe/requirements/cluster.lock ", "")
                             for c in cfg["setup_commands"]]


def _no_env(cfg):
    cfg["worker_start_ray_commands"] = [c.replace("export RAYPIPE_AUTOSCALING=1; ", "")
                                        for c in cfg["worker_start_ray_commands"]]


@pytest.mark.parametrize("mutate, expected", [
    (_gpu_min_one, "min_workers must be 0"),
    (_gpu_max_zero, "max_workers must be >= 1"),
    (_head_gpu, "head must advertise GPU: 0"),
    (_head_gpu_missing, "head must advertise GPU: 0"),
    (_float_cpu, "not an integer"),
    (_bad_head_type, "head_node_type"),
    (_no_gpu_types, "no GPU worker node type"),
    (_mount_missing_source, "does not exist"),
    (_install_other_path, "do not `pip install` the mounted repository"),
    (_no_install, "do not `pip install` the mounted repository"),
    (_mount_elsewhere, "do not `pip install` the mounted repository"),
    (_sync_venv, "rsync_exclude misses .venv"),
    (_old_ray, "is not Ray"),
    (_prefix_ray, "is not Ray"),
    (_old_python, "outside requires-python"),
    (_no_env, "worker_start_ray_commands"),
    (_unlocked_install, "do not install with -c <repository>/requirements/cluster.lock"),
    (_no_auth, "head_start_ray_commands: `ray start` without `export RAY_AUTH_MODE=token;`"),
    (_no_token_mount, "must ship the local ~/.ray/auth_token"),
    (_drivers_on_gpu, "only the head may carry raypipe_driver; it is on ['gpu_1x', 'head']"),
    (_no_driver_resource, "only the head may carry raypipe_driver; it is on []"),
])
def test_each_project_check_can_fail(raw, mutate, expected):
    cfg = copy.deepcopy(raw)
    mutate(cfg)
    problems = project_problems(cfg, CLUSTER_YAML.read_text())
    assert any(expected in p for p in problems), problems


# Secret VALUES (not the names of the variables that hold them) anywhere users copy from.
VALUE_PATTERNS = [r"AKIA[0-9A-Z]{16}", r"ASIA[0-9A-Z]{16}", r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
                  r"(?i)(secret_access_key|auth_token|session_token)\s*[=:]\s*['\"]?[A-Za-z0-9/+]{16,}",
                  r"\b[0-9a-f]{64}\b"]   # a Ray auth token (64 hex digits)


def leaked_values(text: str) -> list[str]:
    return [p for p in VALUE_PATTERNS if re.search(p, text)]


def test_no_credentials_or_tokens_in_cluster_yaml_or_docs():
    files = [CLUSTER_YAML, REPO / "README.md", *sorted((REPO / "docs").glob("*.md")),
             *sorted((REPO / "experiments" / "configs").rglob("*.yaml"))]
    found = {str(f.relative_to(REPO)): leaked_values(f.read_text()) for f in files}
    assert not {f: v for f, v in found.items() if v}
    assert leaked_values("RAY_AUTH_TOKEN=" + "3f" * 32) and leaked_values("AWS_SECRET_ACCESS_KEY=" + "ab12" * 8)


@pytest.mark.parametrize("change, expected", [
    (lambda t: re.sub(r"(?m)^ray==.*$", "ray==2.9.0", t), "pins ray 2.9.0"),
    (lambda t: re.sub(r"(?m)^torch==.*$", "torch==2.0.0", t), "torch 2.0.0 is not torch"),
    (lambda t: re.sub(r"(?m)^optuna==.*\n", "", t), "optuna None is not optuna"),
])
def test_lock_check_can_fail(raw, change, expected):
    lock = (REPO / "requirements" / "cluster.lock").read_text()
    problems = project_problems(raw, CLUSTER_YAML.read_text(), change(lock))
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize("leak", [
    "AKIA" + "ABCDEFGHIJKLMNOP",
    "aws_secret_access_key: abc",
    "-----BEGIN OPENSSH PRIVATE KEY-----",
])
def test_credential_scan_can_fail(raw, leak):
    problems = project_problems(raw, CLUSTER_YAML.read_text() + f"\n# {leak}\n")
    assert any("credential" in p for p in problems), problems


# ---- the docs only use flags and commands that exist --------------------------------
def _tune_margin_flags(text: str) -> set[str]:
    """--flags passed to tune_margin.py in shell snippets (backslash continuations joined)."""
    text = text.replace("\\\n", " ")
    flags = set()
    for line in text.splitlines():
        for m in re.finditer(r"tune_margin\.py\b(.*?)(?:`|$)", line):
            flags |= set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", m.group(1)))
    return flags


def test_documented_tune_margin_flags_exist(capsys):
    from raypipe.tune import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    real = set(re.findall(r"(--[a-z][a-z-]*)", capsys.readouterr().out))
    documented = _tune_margin_flags(CLUSTER_DOC.read_text()) | _tune_margin_flags(CLUSTER_YAML.read_text())
    assert {"--storage", "--max-concurrent-trials"} <= documented  # the extractor finds them
    assert documented <= real, f"documented but not accepted by tune_margin.py: {documented - real}"
    # and an invented flag would be caught
    invented = _tune_margin_flags("ray submit c.yaml experiments/tune_margin.py -- --data x --gpus 4")
    assert invented - real == {"--gpus"}


def test_documented_raypipe_subcommands_exist():
    from raypipe.cli import build_parser

    parser = build_parser()
    text = CLUSTER_DOC.read_text()
    used = re.findall(r"`(raypipe [a-z-]+(?: [a-z-]+)?)", text) + re.findall(r"'(raypipe [a-z-]+)", text)
    assert used, "the extractor found no raypipe command in docs/cluster.md"
    for cmd in used:
        words = cmd.split()[1:]
        try:
            parser.parse_args(words + ["--help"])
        except SystemExit as exc:
            assert exc.code == 0, f"`{cmd}` is not a raypipe command"


def test_documented_config_keys_exist():
    from raypipe.config import load_config

    cfg = load_config(None, [])
    text = CLUSTER_DOC.read_text() + CLUSTER_YAML.read_text()
    # whole dotted paths: plug-in sections nest (teacher.moco.margin, student.ofd.distill_weight)
    keys = set(re.findall(r"\b((?:data|resources|teacher|student|tune)(?:\.[a-z_]+)+)\b", text))
    assert {"resources.use_gpu", "tune.eval_gpus"} <= keys  # the extractor finds them

    def exists(key: str) -> bool:
        node = cfg
        for part in key.split("."):
            if not hasattr(node, part):
                return False
            node = getattr(node, part)
        return True

    assert exists("teacher.moco.margin") and not exists("teacher.margin") and not exists("teacher.moco.bogus")
    missing = [k for k in sorted(keys) if not exists(k)]
    assert not missing, f"documented config keys that do not exist: {missing}"


# ---- an autoscaling cluster: what it can grow to, not what is up now ----------------
def test_concurrency_and_gpus_follow_what_the_autoscaler_can_launch(monkeypatch):
    from raypipe.config import load_config
    from raypipe.cluster import autoscaler_capacity, resolve_use_gpu
    from raypipe.search import trial_concurrency

    capacity = autoscaler_capacity(str(CLUSTER_YAML))
    # global max_workers 8: 4 x gpu_4x (its max), then 4 x gpu_1x; plus the head
    assert capacity["GPU"] == 4 * 4 + 4 * 1 and capacity["CPU"] == 8 + 4 * 48 + 4 * 8
    assert capacity["raypipe_driver"] == 1
    cfg = load_config(REPO / "experiments" / "configs" / "vipriors_resnet50.yaml")
    assert trial_concurrency(cfg, capacity) == 5               # 20 GPUs / (4 workers x 1 GPU)
    # a cold cluster (only the CPU head is up): "auto" still means GPUs, concurrency still 5
    auto = cfg.with_overrides({"resources.use_gpu": "auto"})
    monkeypatch.setenv("RAYPIPE_AUTOSCALING", "1")
    monkeypatch.setenv("RAYPIPE_CLUSTER_CONFIG", str(CLUSTER_YAML))
    assert resolve_use_gpu(auto.resources) and trial_concurrency(auto) == 5
    assert trial_concurrency(auto.with_overrides({"tune.max_concurrent_trials": 2})) == 2
    assert not resolve_use_gpu(auto.with_overrides({"resources.use_gpu": "false"}).resources)
    assert autoscaler_capacity(str(REPO / "no_such_file.yaml")) is None
