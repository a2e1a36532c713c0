"""The commands that start a Ray cluster and an MLflow server for lrsearch, as argv lists.

These functions are the single source of those commands: ``docker/compose.yaml``, the Ray
cluster launcher file ``cluster/gpu-cluster.yaml``, the KubeRay manifests ``cluster/kuberay-*.yaml``
and the tests (the compose-file test and the multi-node test that starts the same processes
without Docker) all compare against or run exactly what these return. Change a command here and
the tests point at every file that must follow.

Pure functions of their arguments, standard library only (no Ray or MLflow import), so a test or a
script can build a command without starting anything.

Security: Ray 2.60 turns token authentication on for ``ray start --head`` when it finds a token.
The commands here never carry the token; every Ray process gets it from its environment
(``RAY_AUTH_MODE=token`` plus ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``).
Dashboards and servers bind to ``127.0.0.1`` unless the caller passes another host (inside a
compose network or a pod they must listen on ``0.0.0.0``; the host publishes them on 127.0.0.1).
The MLflow server runs MLflow's basic-auth app: it has no default admin password and reads it, like
its other secrets, from its environment (see :func:`mlflow_server_command`).

Example:
    >>> head_command(num_cpus=2)
    ['ray', 'start', '--head', '--node-ip-address=127.0.0.1', '--port=6379', '--include-dashboard=true', '--dashboard-host=127.0.0.1', '--dashboard-port=8265', '--num-cpus=2', '--block']
    >>> search_entrypoint("/etc/lrsearch/job.yaml")
    ['lrsearch', 'search', '/etc/lrsearch/job.yaml']
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["head_command", "mlflow_server_command", "search_entrypoint", "worker_command"]


def _port(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"{name}: got {value!r}; allowed: an integer port 1-65535")
    return value


def _count(name: str, value: int | None) -> int | None:
    # `ray start` declares --num-cpus and --num-gpus as integers.
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}: got {value!r}; allowed: an integer >= 0 (or None to auto-detect)")
    return value


def _text(name: str, value: str, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise ValueError(f"{name}: got {value!r}; allowed: a non-empty string without whitespace")
    return value


def _resources(num_cpus: int | None, num_gpus: int | None) -> list[str]:
    args = []
    if _count("num_cpus", num_cpus) is not None:
        args.append(f"--num-cpus={num_cpus}")
    if _count("num_gpus", num_gpus) is not None:
        args.append(f"--num-gpus={num_gpus}")
    return args


def head_command(
    *,
    node_ip: str | None = "127.0.0.1",
    port: int = 6379,
    dashboard_host: str = "127.0.0.1",
    dashboard_port: int = 8265,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    block: bool = True,
    autoscaling_config: str | None = None,
) -> list[str]:
    """``ray start --head`` with the dashboard (and so the Jobs API that ``lrsearch submit`` uses).

    Args:
        node_ip: ``--node-ip-address``; ``None`` leaves it out and Ray picks the node's address
            (what a container or a cloud VM wants).
        port: the GCS port workers join (``--port``).
        dashboard_host: interface the dashboard and Jobs API bind to; ``0.0.0.0`` only inside a
            private network (a compose network, a pod).
        dashboard_port: dashboard / Jobs API port.
        num_cpus: CPUs the node offers; ``None`` auto-detects.
        num_gpus: GPUs the node offers; ``None`` auto-detects.
        block: add ``--block`` (stay in the foreground, as a container's main process must).
        autoscaling_config: ``--autoscaling-config`` (the cluster launcher's head node).

    Returns:
        The argv list, starting with ``ray``.

    Raises:
        ValueError: a port, count or host that ``ray start`` would reject.
    """
    argv = ["ray", "start", "--head"]
    if _text("node_ip", node_ip, optional=True) is not None:
        argv.append(f"--node-ip-address={node_ip}")
    argv += [
        f"--port={_port('port', port)}",
        "--include-dashboard=true",
        f"--dashboard-host={_text('dashboard_host', dashboard_host)}",
        f"--dashboard-port={_port('dashboard_port', dashboard_port)}",
    ]
    argv += _resources(num_cpus, num_gpus)
    if _text("autoscaling_config", autoscaling_config, optional=True) is not None:
        argv.append(f"--autoscaling-config={autoscaling_config}")
    if block:
        argv.append("--block")
    return argv


def worker_command(
    *,
    address: str = "127.0.0.1:6379",
    node_ip: str | None = "127.0.0.1",
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    block: bool = True,
) -> list[str]:
    """``ray start`` for a worker node joining the head's GCS at ``address``.

    Args:
        address: ``HOST:PORT`` of the head's GCS (``ray-head:6379`` in compose,
            ``$RAY_HEAD_IP:6379`` under the cluster launcher).
        node_ip: ``--node-ip-address``; ``None`` leaves it out and Ray picks the node's address.
        num_cpus: CPUs the node offers; ``None`` auto-detects.
        num_gpus: GPUs the node offers; ``None`` auto-detects.
        block: add ``--block``.

    Returns:
        The argv list, starting with ``ray``.

    Raises:
        ValueError: an address without a port, or a bad count.
    """
    _text("address", address)
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port:
        raise ValueError(f"address: got {address!r}; allowed: HOST:PORT of the head's GCS")
    argv = ["ray", "start", f"--address={address}"]
    if _text("node_ip", node_ip, optional=True) is not None:
        argv.append(f"--node-ip-address={node_ip}")
    argv += _resources(num_cpus, num_gpus)
    if block:
        argv.append("--block")
    return argv


def mlflow_server_command(
    *,
    host: str = "127.0.0.1",
    port: int = 5000,
    backend_store_uri: str = "sqlite:///mlflow.db",
    artifacts_destination: str | None = None,
    allowed_hosts: Sequence[str] | None = None,
) -> list[str]:
    """``mlflow server``: the tracking server every trial logs to, behind MLflow's login.

    It runs MLflow's basic-auth app (``--app-name basic-auth``, from ``mlflow[auth]``), which takes
    its secrets from the environment and has no defaults: ``MLFLOW_AUTH_ADMIN_PASSWORD`` (the admin
    account, created on first start; ``MLFLOW_AUTH_ADMIN_USERNAME`` or the ini's ``admin_username``
    names it) and ``MLFLOW_FLASK_SERVER_SECRET_KEY``. ``MLFLOW_AUTH_CONFIG_PATH`` names a
    ``basic_auth.ini`` (where its user database lives). Clients log in with
    ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``.

    Args:
        host: interface to bind; ``0.0.0.0`` only inside a private network.
        port: HTTP port.
        backend_store_uri: runs and metrics (``sqlite:///...``, ``postgresql://user@host/db``).
            Keep passwords out of it: PostgreSQL reads ``PGPASSWORD`` from the environment.
        artifacts_destination: where the server stores artifacts it proxies (``s3://bucket``);
            adds ``--serve-artifacts`` so clients need no storage credentials.
        allowed_hosts: ``Host`` headers the server accepts (``--allowed-hosts``). MLflow's default
            is localhost and private IPs, so a server reached by a compose service name
            (``http://mlflow:5000``) must list that name.

    Returns:
        The argv list, starting with ``mlflow``.

    Raises:
        ValueError: a bad port, host or empty URI.
    """
    argv = [
        "mlflow", "server", "--app-name", "basic-auth",
        "--host", _text("host", host),
        "--port", str(_port("port", port)),
        "--backend-store-uri", _text("backend_store_uri", backend_store_uri),
    ]
    if _text("artifacts_destination", artifacts_destination, optional=True) is not None:
        argv += ["--artifacts-destination", artifacts_destination, "--serve-artifacts"]
    if allowed_hosts is not None:
        if isinstance(allowed_hosts, str) or not allowed_hosts:
            raise ValueError(
                f"allowed_hosts: got {allowed_hosts!r}; allowed: a non-empty list of host patterns"
            )
        argv += ["--allowed-hosts", ",".join(_text("allowed_hosts", h) for h in allowed_hosts)]
    return argv


def search_entrypoint(job_file: str) -> list[str]:
    """The Ray job's entrypoint: ``lrsearch search JOB_FILE`` (the KubeRay ``RayJob`` runs it).

    Args:
        job_file: the job file's path where the job's driver runs (the head node).

    Returns:
        The argv list, starting with ``lrsearch``.
    """
    return ["lrsearch", "search", _text("job_file", job_file)]
