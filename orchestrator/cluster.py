"""Cluster checks: a cluster-launcher YAML against Ray's own schema plus the project's rules, and
the shared-storage rule a multi-node sweep must pass before any trial starts.

The storage rule (documented in docs/cluster.md): on one node any directory will do. On more
than one node (or on a ``ray up`` head that may add workers), Tune's results and checkpoints must
be where every node can reach them:

- a URI of a remote filesystem (``s3://``, ``gs://``, ...) is shared;
- a local path is shared when it lies on a network filesystem (nfs, efs, cifs, lustre, ...,
  read from ``/proc/mounts``) or when the user says so with ``ORCHESTRATE_SHARED_STORAGE=1``;
  either way a marker file written by the driver must then be readable on every live node;
- any other local path is refused (exit 2), because trials on other nodes would write their
  checkpoints to their own disks and a restarted trial could not find them.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

import yaml

from orchestrator.errors import UsageError

PROJECT = "sweep-orchestrator"
STORAGE_ENV = "ORCHESTRATE_STORAGE"
SHARED_ENV = "ORCHESTRATE_SHARED_STORAGE"
BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")  # what `ray up` leaves on the head node
PROBE_TIMEOUT_S = 120
REMOTE_SCHEMES = {"s3", "gs", "gcs", "abfs", "abfss", "az", "hdfs", "viewfs"}
NETWORK_FILESYSTEMS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "lustre", "gpfs", "beegfs",
                       "wekafs", "panfs", "fuse.ceph", "fuse.glusterfs", "fuse.gcsfuse", "fuse.s3fs",
                       "fuse.mountpoint-s3", "fuse.juicefs", "fuse.sshfs", "fuse.rclone"}
LOOPBACK = ("127.", "localhost", "[::1]", "0.0.0.0")
SECRET_PATTERNS = [
    (re.compile(r"AKIA[0-9A-Z]{16}"), "an AWS access key id"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (re.compile(r"(?i)(secret|password|passwd|token|api_key)[A-Z_]*\s*[=:]\s*['\"]?[^\s'\"$]{6,}"), "a secret value"),
]


# ---------------------------------------------------------------- cluster.yaml validation


def ray_schema() -> dict:
    """The cluster-config JSON schema shipped with the installed Ray."""
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _key(path) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def schema_problems(config: dict) -> list[str]:
    import jsonschema

    problems = []
    validator = jsonschema.Draft7Validator(ray_schema())
    for error in sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path))):
        path = list(error.absolute_path)
        if error.validator == "additionalProperties":
            for name in re.findall(r"'([^']+)'", error.message[error.message.rfind("("):]):
                problems.append(f"{_key(path + [name])}: not a key of Ray's cluster schema")
        elif error.validator == "required":
            name = re.findall(r"'([^']+)'", error.message)[0]
            problems.append(f"{_key(path + [name])}: missing (Ray's cluster schema requires it)")
        else:
            problems.append(f"{_key(path)}: {error.message}")
    return problems


def _commands(config: dict, *keys: str) -> list[str]:
    out = []
    for key in keys:
        out += [str(c) for c in config.get(key) or []]
    return out


def _exported(commands: list[str], name: str) -> str | None:
    for command in commands:
        match = re.search(rf"\b{name}=[\"']?([^\"'\s;]+)", command)
        if match:
            return match.group(1)
    return None


def _installs_project(command: str) -> str | None:
    """The pip target naming this project in ``command`` ("" for a non-path target), else None."""
    if not re.search(r"\bpip3?\s+install\b", command):
        return None
    for token in command.split():
        if PROJECT in token:
            target = token.strip("'\"").split("[")[0]
            return target if target.startswith(("/", "~", ".")) else ""
    return None


def _under(path: str, roots) -> bool:
    path = path.rstrip("/")
    return any(path == r.rstrip("/") or path.startswith(r.rstrip("/") + "/") for r in roots)


def _node_type_problems(config: dict) -> list[str]:
    """A cloud cluster: a head type, a GPU worker type that can scale above zero, sane counts."""
    problems = []
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    if head not in types:
        problems.append(f"head_node_type: {head!r} is not one of available_node_types ({', '.join(types) or 'none'})")
    gpu_types = [name for name, spec in types.items() if name != head and (spec.get("resources") or {}).get("GPU", 0) >= 1]
    if not gpu_types:
        problems.append("available_node_types: no worker node type declares resources.GPU >= 1")
    for name, spec in types.items():
        low, high = spec.get("min_workers", 0), spec.get("max_workers", config.get("max_workers", 0))
        if name != head and isinstance(low, int) and isinstance(high, int) and low > high:
            problems.append(f"available_node_types.{name}.min_workers: {low} is more than max_workers {high}")
        if name in gpu_types and high == 0:
            problems.append(f"available_node_types.{name}.max_workers: 0 leaves the cluster without GPU workers")
    total_min = sum(s.get("min_workers", 0) for n, s in types.items() if n != head and isinstance(s.get("min_workers", 0), int))
    if isinstance(config.get("max_workers"), int) and total_min > config["max_workers"]:
        problems.append(f"max_workers: {config['max_workers']} is less than the node types' min_workers ({total_min})")
    return problems


def _local_node_problems(config: dict) -> list[str]:
    """On premises (provider ``local``): Ray makes one node type itself and detects each
    machine's GPUs, so the file names machines instead of node types."""
    problems = [f"{key}: Ray builds node types itself for provider local; remove it"
                for key in ("available_node_types", "head_node_type") if key in config]
    if not (config.get("provider") or {}).get("worker_ips"):
        problems.append("provider.worker_ips: no worker machines (the GPU machines the trials run on)")
    return problems


def project_problems(config: dict) -> list[str]:
    """The project's rules on top of Ray's schema (each message starts with the offending key)."""
    on_premises = (config.get("provider") or {}).get("type") == "local"
    problems = _local_node_problems(config) if on_premises else _node_type_problems(config)
    setup = _commands(config, "setup_commands")
    targets = [t for t in (_installs_project(c) for c in setup) if t is not None]
    if not targets:
        problems.append(f"setup_commands: no command runs `pip install` of {PROJECT} on every node")
    mounts = list((config.get("file_mounts") or {}).keys())
    for target in targets:
        if target and not _under(target, mounts):
            problems.append(f"file_mounts: the project is installed from {target}, which no file_mounts entry copies to the nodes")

    problems += _storage_problems(config, setup)
    tracking = _exported(setup, "MLFLOW_TRACKING_URI")
    if tracking is None:
        problems.append("setup_commands: no command exports MLFLOW_TRACKING_URI (the tracking server the sweeps log to)")
    elif not tracking.startswith(("http://", "https://")) or any(h in tracking for h in LOOPBACK):
        problems.append(f"setup_commands: MLFLOW_TRACKING_URI={tracking} is not an http(s) address the workers can reach")

    for command in _commands(config, "head_start_ray_commands"):
        match = re.search(r"--dashboard-host[= ]+(\S+)", command)
        if match and match.group(1) not in ("127.0.0.1", "localhost"):
            problems.append(f"head_start_ray_commands: --dashboard-host={match.group(1)} exposes the dashboard; "
                            "bind 127.0.0.1 and reach it with `ray dashboard cluster.yaml`")
    problems += _secret_problems(config, [])
    return problems


def _storage_problems(config: dict, setup: list[str]) -> list[str]:
    storage = _exported(setup, STORAGE_ENV)
    if storage is None:
        return [f"setup_commands: no command exports {STORAGE_ENV} (the shared storage for Tune results)"]
    if is_remote_uri(storage):
        return []
    mount_commands = _commands(config, "initialization_commands", "setup_commands")
    mounted = [m.group(1) for c in mount_commands for m in re.finditer(r"\bmount\b[^;&|]*?\s(/[^\s;&|)]+)", c)]
    if not _under(storage, mounted):
        return [f"setup_commands: {STORAGE_ENV}={storage} is each node's own disk: use a URI (s3://, gs://) or a "
                "directory a mount command in initialization_commands/setup_commands mounts on every node"]
    docker = config.get("docker") or {}
    if docker.get("image") or docker.get("head_image") or docker.get("worker_image"):
        options = " ".join(str(o) for o in docker.get("run_options") or [])
        volumes = re.findall(r"(?:-v|--volume)[= ]\S+?:(/[^\s:]+)", options)
        if not _under(storage, volumes):
            return [f"docker.run_options: {STORAGE_ENV}={storage} is mounted on the host but no -v option brings it into the container"]
    return []


def _secret_problems(value, path: list) -> list[str]:
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _secret_problems(v, path + [k])]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _secret_problems(v, path + [i])]
    if isinstance(value, str):
        return [f"{_key(path)}: looks like {what}; keep credentials out of cluster.yaml (use instance roles or the environment)"
                for pattern, what in SECRET_PATTERNS if pattern.search(value)]
    return []


def validate_cluster_file(path: Path) -> list[str]:
    """Every problem of a cluster-launcher file, Ray's schema first, then the project's rules."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no cluster file at {path}")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: malformed YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise UsageError(f"{path}: expected a mapping of cluster settings")
    return schema_problems(config) + project_problems(config)


# ---------------------------------------------------------------- shared storage for a sweep


def is_remote_uri(storage: str) -> bool:
    scheme, sep, _ = storage.partition("://")
    return bool(sep) and scheme.lower() in REMOTE_SCHEMES


def filesystem_type(path: Path, mounts: str | None = None) -> str:
    """The type of the filesystem holding ``path``, from the longest matching mount point."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return "unknown"
    path = str(Path(path).resolve())
    best, kind = "", "unknown"
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        if _under(path, [point]) and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def cluster_can_grow(config_path: Path = BOOTSTRAP_CONFIG) -> bool:
    """True on a head started by ``ray up`` whose config allows worker nodes (they may join
    after the sweep starts, so one node now is no proof)."""
    path = config_path.expanduser()
    if not path.is_file():
        return False
    try:
        return int((yaml.safe_load(path.read_text()) or {}).get("max_workers", 0)) > 0
    except (yaml.YAMLError, TypeError, ValueError):
        return False


def _marker_matches(path: str, token: str) -> bool:
    try:
        return Path(path).read_text() == token
    except OSError:
        return False


def check_shared_storage(storage: str) -> None:
    """Refuse (exit 2) a storage location some node of the connected Ray cluster cannot reach."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if (len(nodes) <= 1 and not cluster_can_grow()) or is_remote_uri(storage):
        return
    directory = Path(storage)
    kind = filesystem_type(directory)
    asserted = os.environ.get(SHARED_ENV, "").lower() in ("1", "true", "yes")
    if kind not in NETWORK_FILESYSTEMS and not asserted:
        raise UsageError(
            f"storage {storage} is a local directory ({kind}) but the cluster has {len(nodes)} nodes: trials on other "
            f"nodes could not reach its checkpoints. Use a URI every node reaches (s3://, gs://), a network filesystem "
            f"mounted on every node, or set {SHARED_ENV}=1 if this directory is the same on every node")
    directory.mkdir(parents=True, exist_ok=True)
    marker, token = directory / f".orchestrate-probe-{uuid.uuid4().hex}", uuid.uuid4().hex
    marker.write_text(token)
    try:
        probe = ray.remote(num_cpus=0)(_marker_matches)
        refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(str(marker), token)
                for n in nodes]
        try:
            seen = ray.get(refs, timeout=PROBE_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise UsageError(f"storage check: some nodes did not answer within {PROBE_TIMEOUT_S} s") from None
    finally:
        marker.unlink(missing_ok=True)
    blind = [f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})" for n, ok in zip(nodes, seen) if not ok]
    if blind:
        raise UsageError(f"storage {storage} is not shared: nodes {', '.join(blind)} do not see files the driver writes there")
