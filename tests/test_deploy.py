"""The deployment files: deploy/kubernetes (kustomize), compose.yaml and the Dockerfile.

deploy/check.py renders every kustomization with kustomize, validates the objects against the
Kubernetes schemas (strict) and checks the facts the deployment depends on; these tests run it
as CI does, break copies of the files to see it refuse each broken fact, assert the main facts
once more on what it rendered, and run the manifests' own commands and settings against a real
database of each kind: the migration Job's command, then the server's, probed as the kubelet
probes it, and stopped as the kubelet stops it.
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import urllib.request
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.config import Config
from service.server import LIVENESS, READINESS, bootstrap_key_path
from tests.conftest import BACKENDS
from tests.databases import fresh_postgres_database
from tests.test_server import _free_port

REPO = Path(__file__).resolve().parent.parent
CHECK = REPO / "deploy" / "check.py"
UID = 10001  # the Dockerfile's USER
SERVING = health_pb2.HealthCheckResponse.SERVING


def run_check(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(CHECK), "--repo", str(repo), *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def checked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """deploy/check.py on this checkout, as .ci/run runs it: what it rendered and checked."""
    out = tmp_path_factory.mktemp("deploy") / "checked.json"
    done = run_check(REPO, "--json", str(out))
    assert done.returncode == 0, f"deploy/check.py failed:\n{done.stdout}\n{done.stderr}"
    return json.loads(out.read_text())


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def server_of(checked: dict[str, Any], root: str = "base") -> dict[str, Any]:
    (deployment,) = of_kind(checked["kubernetes"][root], "Deployment")
    return deployment


def container_of(owner: dict[str, Any]) -> dict[str, Any]:
    (container,) = owner["spec"]["template"]["spec"]["containers"]
    return container


def literal_env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


# --- the check, as CI runs it, and what it refuses -------------------------------------------


def test_every_root_renders_and_is_valid(checked: dict[str, Any]) -> None:
    kinds = {root: sorted(d["kind"] for d in docs) for root, docs in checked["kubernetes"].items()}
    assert kinds == {
        "base": ["Deployment", "PersistentVolumeClaim", "PodDisruptionBudget", "Secret", "Service", "Service", "ServiceAccount"],
        "migrate": ["Job", "Secret"],
        "overlays/production": ["Deployment", "HorizontalPodAutoscaler", "PersistentVolumeClaim", "PodDisruptionBudget", "Service", "Service", "ServiceAccount"],
        "overlays/production/migrate": ["Job"],
    }


# (file, text, replacement, from the end?, what deploy/check.py must say)
BREAKAGES = [
    ("deploy/kubernetes/base/deployment.yaml", "readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false", False, "readOnlyRootFilesystem must be true"),
    ("deploy/kubernetes/base/deployment.yaml", "runAsUser: 10001", "runAsUser: 1000", False, "runAsUser must be 10001"),
    ("deploy/kubernetes/base/deployment.yaml", 'drop: ["ALL"]', 'drop: ["NET_RAW"]', False, "capabilities must drop ALL"),
    ("deploy/kubernetes/base/deployment.yaml", "service: readiness", "service: liveness", False, "readinessProbe must be grpc {port: 50051, service: readiness}"),
    ("deploy/kubernetes/base/deployment.yaml", "allowPrivilegeEscalation: false", "allowPrivilegeEscalations: false", False, "'allowPrivilegeEscalations' was unexpected"),
    ("deploy/kubernetes/base/deployment.yaml", "terminationGracePeriodSeconds: 30", "terminationGracePeriodSeconds: 20", False, "terminationGracePeriodSeconds must exceed"),
    ("deploy/kubernetes/base/deployment.yaml", 'value: "false"', 'value: "true"', False, 'NEXUS_MIGRATE_ON_START must be "false"'),
    ("deploy/kubernetes/base/deployment.yaml", "value: /data/bootstrap-admin-key", "value: data/bootstrap-admin-key", False, "NEXUS_BOOTSTRAP_KEY_FILE must be set to a path on a writable volume"),
    ("deploy/kubernetes/base/deployment.yaml", "          env:\n", "          env:\n            - name: DB_PASSWORD\n              value: hunter2\n", False, "DB_PASSWORD is written in the manifest"),
    ("deploy/kubernetes/base/service.yaml", "appProtocol: kubernetes.io/h2c", "appProtocol: http", False, "port named grpc to 50051 with appProtocol kubernetes.io/h2c"),
    ("deploy/kubernetes/base/kustomization.yaml", "  - pdb.yaml\n", "", False, "no PodDisruptionBudget selects its pods"),
    ("deploy/kubernetes/migrate/job.yaml", 'args: ["migrate"]', 'args: ["serve"]', False, "must run `nexus-data migrate`"),
    ("deploy/kubernetes/components/example-secret/secret.example.env", "CHANGE-ME", "hunter2", False, "DATABASE_URL is not a placeholder"),
    ("deploy/kubernetes/overlays/production/kustomization.yaml", "  - path: delete-example-secret.yaml\n", "", False, "renders a Secret"),
    ("compose.yaml", "condition: service_completed_successfully", "condition: service_started", False, "nexus-data must depend on migrate with condition service_completed_successfully"),
    ("compose.yaml", "POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD in .env}", "POSTGRES_PASSWORD: hunter2", False, "postgres: POSTGRES_PASSWORD carries a literal secret"),
    ("compose.yaml", "    read_only: true\n", "", True, "nexus-data runs with a read-only root filesystem"),
    ("compose.yaml", '"127.0.0.1:9464:9464"', '"9464:9464"', False, "nexus-data: the port '9464:9464' is published on every interface"),
    ("compose.yaml", '"127.0.0.1:50051:50051"', '"0.0.0.0:50051:50051"', False, "nexus-data: the port '0.0.0.0:50051:50051' is published on every interface"),
    ("Dockerfile", "    PYTHONDONTWRITEBYTECODE=1 \\\n", "", True, "must set PYTHONDONTWRITEBYTECODE=1"),
]


@pytest.mark.parametrize("path,text,replacement,from_end,said", BREAKAGES, ids=[f"{b[0].rsplit('/', 1)[-1]}:{b[4][:40]}" for b in BREAKAGES])
def test_the_check_refuses_a_broken_copy(tmp_path: Path, path: str, text: str, replacement: str, from_end: bool, said: str) -> None:
    copy = tmp_path / "repo"
    copy.mkdir()
    shutil.copy(REPO / "Dockerfile", copy)
    shutil.copy(REPO / "compose.yaml", copy)
    shutil.copytree(REPO / "deploy", copy / "deploy", ignore=shutil.ignore_patterns(".tools", "__pycache__"))
    target = copy / path
    original = target.read_text()
    assert text in original, f"{path} no longer has {text!r}: update this breakage"
    at = original.rfind(text) if from_end else original.find(text)
    target.write_text(original[:at] + replacement + original[at + len(text) :])
    done = run_check(copy)
    assert done.returncode == 1, f"the check passed a broken {path}:\n{done.stdout}\n{done.stderr}"
    assert said in done.stderr, done.stderr


# --- the facts, on what kustomize rendered ------------------------------------------------


@pytest.mark.parametrize("root", ["base", "migrate", "overlays/production", "overlays/production/migrate"])
def test_pods_run_as_the_images_user_on_a_read_only_root(checked: dict[str, Any], root: str) -> None:
    owners = of_kind(checked["kubernetes"][root], "Deployment") + of_kind(checked["kubernetes"][root], "Job")
    assert owners
    assert str(UID) == checked["dockerfile"]["uid"]
    for owner in owners:
        pod = owner["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == UID
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        container = container_of(owner)
        sc = container["securityContext"]
        assert (sc["readOnlyRootFilesystem"], sc["allowPrivilegeEscalation"], sc["capabilities"]["drop"]) == (True, False, ["ALL"])
        volumes = {v["name"]: v for v in pod["volumes"]}
        tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert tmp and "emptyDir" in volumes[tmp[0]["name"]]
        assert {"cpu", "memory"} <= set(container["resources"]["requests"]) & set(container["resources"]["limits"])


@pytest.mark.parametrize("root", ["base", "overlays/production"])
def test_the_server_is_probed_on_its_health_services_and_named_ports(checked: dict[str, Any], root: str) -> None:
    deployment = server_of(checked, root)
    container = container_of(deployment)
    assert container["args"] == ["serve"]
    assert container["livenessProbe"]["grpc"] == {"port": 50051, "service": LIVENESS}
    assert container["readinessProbe"]["grpc"] == {"port": 50051, "service": READINESS}
    assert container["startupProbe"]["grpc"] == {"port": 50051, "service": LIVENESS}
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"grpc": 50051, "metrics": 9464}
    env = literal_env(container)
    assert (env["NEXUS_PORT"], env["NEXUS_METRICS_PORT"], env["NEXUS_MIGRATE_ON_START"]) == ("50051", "9464", "false")
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert (annotations["prometheus.io/scrape"], annotations["prometheus.io/port"]) == ("true", "9464")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    services = of_kind(checked["kubernetes"][root], "Service")
    assert services and all(s["spec"]["selector"].items() <= labels.items() for s in services)
    for service in services:
        (grpc_port,) = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
        assert (grpc_port["port"], grpc_port["targetPort"], grpc_port["appProtocol"]) == (50051, "grpc", "kubernetes.io/h2c")
    (pdb,) = of_kind(checked["kubernetes"][root], "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1


def test_production_autoscales_the_deployment_it_does_not_size(checked: dict[str, Any]) -> None:
    (hpa,) = of_kind(checked["kubernetes"]["overlays/production"], "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "nexus-data"}
    assert "replicas" not in server_of(checked, "overlays/production")["spec"]
    assert server_of(checked, "base")["spec"]["replicas"] >= 2
    images = {container_of(server_of(checked, "overlays/production"))["image"], container_of(of_kind(checked["kubernetes"]["overlays/production/migrate"], "Job")[0])["image"]}
    assert len(images) == 1, "production's Job migrates with the servers' image"


@pytest.mark.parametrize("root", ["migrate", "overlays/production/migrate"])
def test_the_migration_job_runs_migrate_with_the_servers_secret(checked: dict[str, Any], root: str) -> None:
    (job,) = of_kind(checked["kubernetes"][root], "Job")
    container = container_of(job)
    assert container["args"] == ["migrate"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    server_url = {e["name"]: e for e in container_of(server_of(checked))["env"]}["DATABASE_URL"]
    assert {e["name"]: e for e in container["env"]}["DATABASE_URL"] == server_url == {
        "name": "DATABASE_URL",
        "valueFrom": {"secretKeyRef": {"name": "nexus-data-secrets", "key": "DATABASE_URL"}},
    }


def test_no_secret_value_is_in_the_repository(checked: dict[str, Any]) -> None:
    for root, docs in checked["kubernetes"].items():
        for secret in of_kind(docs, "Secret"):
            assert not root.startswith("overlays/production")
            for key, value in secret["data"].items():
                assert "CHANGE-ME" in base64.b64decode(value).decode(), (root, key)
        for owner in of_kind(docs, "Deployment") + of_kind(docs, "Job"):
            for entry in container_of(owner)["env"]:
                if re.search(r"DATABASE_URL|PASSWORD|SECRET|TOKEN", entry["name"]):
                    assert "value" not in entry and "secretKeyRef" in entry["valueFrom"], (root, entry)
    for name, service in checked["compose"]["services"].items():
        for variable, value in service.get("environment", {}).items():
            if re.search(r"DATABASE_URL|PASSWORD|SECRET", variable):
                assert "${POSTGRES_PASSWORD:?" in str(value), (name, variable)


def test_the_servers_settings_are_ones_the_service_reads_and_accepts(checked: dict[str, Any]) -> None:
    """A misspelt variable would be ignored without a word; every one set is read by the
    service, and together they are a valid
    configuration whose files are all on the /data volume."""
    sources = "".join(p.read_text() for d in ("service", "db") for p in (REPO / d).rglob("*.py"))
    for root in ("base", "overlays/production"):
        deployment = server_of(checked, root)
        container = container_of(deployment)
        env = literal_env(container)
        for variable in {e["name"] for e in container["env"]}:
            assert f'"{variable}"' in sources, f"{root}: {variable} is read nowhere in service/ or db/"
        config = Config.from_env({**env, "DATABASE_URL": "postgresql://nexus:x@db:5432/nexus"})
        assert config.migrate_on_start is False
        assert config.blob_path.startswith("/data/") and str(bootstrap_key_path(config)).startswith("/data/")
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert config.drain_seconds + config.grace_seconds < grace


def test_compose_starts_postgres_then_migrate_then_the_server(checked: dict[str, Any]) -> None:
    services = checked["compose"]["services"]
    assert services["postgres"]["image"] == "postgres:15"
    assert services["migrate"]["command"] == ["migrate"] and services["migrate"]["restart"] == "no"
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    server = services["nexus-data"]
    assert server["build"] == "." and server["image"] == services["migrate"]["image"]
    assert server["depends_on"] == {"postgres": {"condition": "service_healthy"}, "migrate": {"condition": "service_completed_successfully"}}
    assert all(services[name]["healthcheck"]["test"] for name in ("postgres", "redis", "nexus-data"))
    assert "nexus-data:/data" in server["volumes"] and "nexus-data" in checked["compose"]["volumes"]
    assert (server["user"], server["read_only"], server["cap_drop"]) == (f"{UID}:{UID}", True, ["ALL"])
    assert server["environment"]["NEXUS_MIGRATE_ON_START"] == "false"


# --- the manifests' commands and settings, run ---------------------------------------------


@pytest.fixture(params=BACKENDS)
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'sqlite' / 'nexus.db'}"
    else:
        with fresh_postgres_database() as url:
            yield url


def _health(port: int, service: str) -> int | None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
        except grpc.RpcError:
            return None


@pytest.mark.slow
def test_the_job_then_the_deployment_serve_on_a_read_only_root(checked: dict[str, Any], empty_database: str, tmp_path: Path) -> None:
    """The Deployment's server refuses a database the Job has not migrated yet; the Job's command
    migrates it; then the Deployment's command, with the Deployment's settings and the image's
    environment, passes the startup, liveness and readiness probes (and compose's healthcheck),
    writes only under /data and /tmp (here: directories standing for them) and stops within
    terminationGracePeriodSeconds of SIGTERM."""
    (tmp_path / "sqlite").mkdir()
    root, home, data, tmp = (tmp_path / name for name in ("root", "home", "data", "tmp"))
    for directory in (root, home, data, tmp):
        directory.mkdir()
    deployment = server_of(checked)
    server = container_of(deployment)
    (job,) = of_kind(checked["kubernetes"]["migrate"], "Job")
    port, metrics_port = _free_port(), _free_port()
    image_env = {k: v for k, v in checked["dockerfile"]["env"].items() if k not in ("PATH", "DB_PATH", "NEXUS_BLOB_DIR", "NEXUS_DATA_DIR")}
    base_env = {"PATH": os.environ["PATH"], "HOME": str(home), "TMPDIR": str(tmp), **image_env, "DATABASE_URL": empty_database,
                "NEXUS_HASH_TIME_COST": "1", "NEXUS_HASH_MEMORY_KIB": "1024"}
    at = {"/data/": f"{data}/", "/tmp/": f"{tmp}/"}
    server_env = {**base_env, **{k: re.sub(r"^/(data|tmp)/", lambda m: at[m.group(0)], v) for k, v in literal_env(server).items()},
                  "NEXUS_HOST": "127.0.0.1", "NEXUS_PORT": str(port), "NEXUS_METRICS_PORT": str(metrics_port)}
    nexus_data = str(Path(sys.executable).parent / "nexus-data")

    early = subprocess.run([nexus_data, *server["args"]], cwd=root, env=server_env, capture_output=True, text=True, timeout=60)
    assert early.returncode != 0, "a server started before the migration Job must not serve"
    assert "refusing to start" in early.stderr and "nexus-data migrate" in early.stderr, early.stderr

    migrated = subprocess.run([nexus_data, *container_of(job)["args"]], cwd=root, env={**base_env, **literal_env(container_of(job))},
                              capture_output=True, text=True, timeout=120)
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr

    log = (tmp_path / "server.log").open("w+")
    proc = subprocess.Popen([nexus_data, *server["args"]], cwd=root, env=server_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while _health(port, server["startupProbe"]["grpc"]["service"]) != SERVING and time.monotonic() < deadline:
            assert proc.poll() is None, "the server exited"
            time.sleep(0.1)
        assert _health(port, server["livenessProbe"]["grpc"]["service"]) == SERVING
        # What the pod's prometheus.io annotations point a scraper at answers.
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as scraped:
            assert b"nexus_build_info" in scraped.read()
        while _health(port, server["readinessProbe"]["grpc"]["service"]) != SERVING and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _health(port, server["readinessProbe"]["grpc"]["service"]) == SERVING
        healthcheck = checked["compose"]["services"]["nexus-data"]["healthcheck"]["test"]
        assert healthcheck[:3] == ["CMD", "python", "-c"]
        probe = healthcheck[3].replace("127.0.0.1:50051", f"127.0.0.1:{port}")
        assert subprocess.run([sys.executable, "-c", probe], env=server_env, timeout=30).returncode == 0

        key = Path(server_env["NEXUS_BOOTSTRAP_KEY_FILE"])
        assert key.is_relative_to(data) and key.read_text().startswith("NEXUS_ADMIN_KEY=")
        assert key.stat().st_mode & 0o777 == 0o600
        assert (data / "blobs").is_dir()

        stopped = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]) == 0
        assert time.monotonic() - stopped >= float(server_env["NEXUS_DRAIN_SECONDS"]) - 0.5, "the drain was skipped"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.seek(0)
        output = log.read()
        log.close()
    assert list(root.iterdir()) == [], f"written in the working directory (the image's root filesystem): {list(root.iterdir())}"
    assert list(home.iterdir()) == [], f"written in HOME (the image's root filesystem): {list(home.iterdir())}"
    assert "Traceback" not in output, output
