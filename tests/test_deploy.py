"""Deployment artefacts: Kubernetes manifests (schema-validated offline), the policy reloader
sidecar (run for real against a real process), docker-compose and the Dockerfile."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from proxy.policy.loader import parse_policy

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.33"


def manifest_files() -> list[Path]:
    return sorted(p for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml")


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def resources() -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> resource, over every manifest."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path in manifest_files():
        for doc in documents(path):
            found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


def deployment() -> dict[str, Any]:
    return resources()[("Deployment", "pgveil")]


def container(name: str) -> dict[str, Any]:
    containers = deployment()["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == name)


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_every_manifest_is_valid_against_the_kubernetes_schema(path: Path) -> None:
    docs = documents(path)
    assert docs, f"{path.name} holds no resource"
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name}: {doc['kind']}/{doc['metadata']['name']}: "
                        f"{exc.message} at {'.'.join(map(str, exc.path))}")


def test_kustomization_applies_every_manifest_except_the_example_secret() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in manifest_files()} - {"secret.example.yaml"}


def test_the_kinds_a_platform_team_needs_are_all_there() -> None:
    kinds = {kind for kind, _ in resources()}
    assert {"Deployment", "Service", "ConfigMap", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "NetworkPolicy", "ServiceAccount", "Secret"} <= kinds


def test_deployment_runs_several_replicas_with_health_and_readiness_probes() -> None:
    spec = deployment()["spec"]
    assert spec["replicas"] >= 3
    pgveil = container("pgveil")
    assert pgveil["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pgveil["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert pgveil["args"][:1] == ["serve"]


def test_every_container_is_non_root_read_only_with_requests_and_limits() -> None:
    pod = deployment()["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    for each in pod["containers"]:
        assert each["securityContext"]["readOnlyRootFilesystem"] is True, each["name"]
        assert each["securityContext"]["allowPrivilegeEscalation"] is False, each["name"]
        assert each["securityContext"]["capabilities"]["drop"] == ["ALL"], each["name"]
        assert {"cpu", "memory"} <= set(each["resources"]["requests"]), each["name"]
        assert {"cpu", "memory"} <= set(each["resources"]["limits"]), each["name"]


def test_probes_and_service_use_ports_the_pgveil_container_declares() -> None:
    pgveil = container("pgveil")
    declared = {port["name"]: port["containerPort"] for port in pgveil["ports"]}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert pgveil[probe]["httpGet"]["port"] in declared, probe
    service = resources()[("Service", "pgveil")]["spec"]
    assert {port["targetPort"] for port in service["ports"]} <= set(declared)
    config = yaml.safe_load((ROOT / "deploy" / "config.yaml").read_text())
    assert int(config["listen"].rsplit(":", 1)[1]) == declared["postgres"]
    assert int(config["metrics"].rsplit(":", 1)[1]) == declared["metrics"]
    network = resources()[("NetworkPolicy", "pgveil")]["spec"]
    allowed_in = {port["port"] for rule in network["ingress"] for port in rule["ports"]}
    assert allowed_in == {declared["postgres"], declared["metrics"]}


def test_policy_comes_from_a_configmap_mounted_as_a_directory_so_updates_propagate() -> None:
    pod = deployment()["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "policy")
    assert volume["configMap"]["name"] == "pgveil-policy"
    for name in ("pgveil", "policy-reloader"):
        mount = next(m for m in container(name)["volumeMounts"] if m["name"] == "policy")
        assert "subPath" not in mount  # subPath mounts never see ConfigMap updates
        assert mount["mountPath"] == "/etc/pgveil/policy"
    assert pod["shareProcessNamespace"] is True  # the reloader must see pgveil to signal it


def test_configmap_policy_is_a_valid_policy() -> None:
    configmap = resources()[("ConfigMap", "pgveil-policy")]
    policy = parse_policy(configmap["data"]["policy.yaml"], "pgveil-policy", require_hash_key=False)
    assert policy.roles


def test_configmap_settings_match_the_image_default_config() -> None:
    configmap = resources()[("ConfigMap", "pgveil-config")]
    in_cluster = yaml.safe_load(configmap["data"]["config.yaml"])
    in_image = yaml.safe_load((ROOT / "deploy" / "config.yaml").read_text())
    assert in_cluster == in_image
    assert in_image["policy"].startswith("/etc/pgveil/policy/")


def test_only_pgveil_may_reach_the_database() -> None:
    policy = resources()[("NetworkPolicy", "postgres-only-from-pgveil")]["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    sources = [peer for rule in policy["ingress"] for peer in rule["from"]]
    assert sources == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "pgveil"}}}]


def test_service_and_disruption_budget_select_the_pgveil_pods() -> None:
    labels = deployment()["spec"]["template"]["metadata"]["labels"]
    service = resources()[("Service", "pgveil")]["spec"]
    pdb = resources()[("PodDisruptionBudget", "pgveil")]["spec"]
    assert service["selector"].items() <= labels.items()
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["minAvailable"] < deployment()["spec"]["replicas"]
    hpa = resources()[("HorizontalPodAutoscaler", "pgveil")]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "pgveil"}
    assert hpa["minReplicas"] >= 3


# --- the policy reloader sidecar, run for real --------------------------------------------------

SIGHUP_COUNTER = """
import signal, sys, time
marker = sys.argv[1]
def on_hup(signum, frame):
    with open(marker, "a") as handle:
        handle.write("hup\\n")
signal.signal(signal.SIGHUP, on_hup)
print("ready", flush=True)
while True:
    time.sleep(3600)
"""


def publish_configmap_version(directory: Path, version: str, policy_text: str) -> None:
    """Lay files out as the kubelet does: ..<version>/file, ..data -> ..<version>, file -> ..data/file."""
    versioned = directory / f"..{version}"
    versioned.mkdir()
    (versioned / "policy.yaml").write_text(policy_text)
    staging = directory / "..data_tmp"
    staging.symlink_to(versioned.name)
    os.replace(staging, directory / "..data")
    if not (directory / "policy.yaml").is_symlink():
        (directory / "policy.yaml").symlink_to("..data/policy.yaml")


def wait_for(condition: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def fake_pgveil(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str, Path]]:
    """A real process whose command line carries a unique token and that records each SIGHUP."""
    token = f"pgveil-reload-target-{uuid.uuid4().hex}"
    marker = tmp_path / "sighups"
    process = subprocess.Popen([sys.executable, "-c", SIGHUP_COUNTER, str(marker), token],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    yield process, token, marker
    process.kill()
    process.wait()


def test_reloader_sends_sighup_to_pgveil_when_the_configmap_changes(
        tmp_path: Path, fake_pgveil: tuple[subprocess.Popen[str], str, Path]) -> None:
    target, token, marker = fake_pgveil
    watched = tmp_path / "policy"
    watched.mkdir()
    publish_configmap_version(watched, "2026_01_01_00_00_00.1", "version: 1\n")
    reloader_command = container("policy-reloader")["command"]
    assert reloader_command[:2] == ["python", "-c"]
    env = dict(os.environ, WATCH_DIR=str(watched), TARGET_MATCH=token, INTERVAL_SECONDS="0.05")
    reloader = subprocess.Popen([sys.executable, *reloader_command[1:]], env=env,
                                stdout=subprocess.PIPE, text=True)
    try:
        assert reloader.stdout is not None
        assert "watching" in reloader.stdout.readline()
        assert not marker.exists()  # nothing changed yet: no reload
        publish_configmap_version(watched, "2026_01_01_00_05_00.2", "version: 1\nroles: {}\n")
        wait_for(marker.exists, "the SIGHUP to reach the pgveil process")
        announcement = reloader.stdout.readline()
        assert f"SIGHUP to [{target.pid}]" in announcement
        assert marker.read_text() == "hup\n"
    finally:
        reloader.send_signal(signal.SIGTERM)
        reloader.wait()


# --- docker-compose and Dockerfile ------------------------------------------------------------------

def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "deploy" / "docker-compose.yaml").read_text())
    return loaded


def test_compose_runs_pgveil_serve_in_front_of_an_unexposed_database() -> None:
    services = compose()["services"]
    pgveil, postgres = services["pgveil"], services["postgres"]
    assert pgveil["command"][:3] == ["serve", "--config", "/etc/pgveil/config.yaml"]
    assert "PGVEIL_UPSTREAM" in pgveil["environment"]
    assert "postgres:5432" in pgveil["environment"]["PGVEIL_UPSTREAM"]
    assert "ports" not in postgres
    assert postgres["networks"] == ["database"]
    assert compose()["networks"]["database"]["internal"] is True
    assert pgveil["read_only"] is True


def test_compose_mounts_files_that_exist_in_the_repository() -> None:
    for service in compose()["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (ROOT / "deploy" / source).resolve().is_file(), source


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1].strip()) for text in logical]


def test_dockerfile_is_multi_stage_and_runs_pgveil_as_a_non_root_user() -> None:
    instructions = dockerfile_instructions()
    stages = [args for op, args in instructions if op == "FROM"]
    assert len(stages) >= 2
    users = [args for op, args in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert json.loads(next(args for op, args in instructions if op == "ENTRYPOINT")) == ["pgveil"]
    assert json.loads(next(args for op, args in instructions if op == "CMD"))[:1] == ["serve"]


def test_dockerfile_healthcheck_probes_healthz_on_the_configured_metrics_port() -> None:
    healthcheck = next(args for op, args in dockerfile_instructions() if op == "HEALTHCHECK")
    metrics = yaml.safe_load((ROOT / "deploy" / "config.yaml").read_text())["metrics"]
    port = metrics.rsplit(":", 1)[1]
    assert f"127.0.0.1:{port}/healthz" in healthcheck
    assert "curl" not in healthcheck and "wget" not in healthcheck


def test_dockerfile_copies_only_files_that_exist_and_are_not_ignored() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for op, args in dockerfile_instructions():
        if op != "COPY" or args.startswith("--from"):
            continue
        for source in args.split()[:-1]:
            assert (ROOT / source).exists(), source
            assert source.split("/")[0] not in ignored, source


def test_container_config_uses_only_settings_pgveil_serve_knows() -> None:
    from proxy.config import load_settings

    settings = load_settings({"config": str(ROOT / "deploy" / "config.yaml")},
                             environ={"PGVEIL_UPSTREAM": "postgresql://catalog@db:5432/app"})
    assert settings.extra == {}
    assert settings.listen == "0.0.0.0:6432"
    assert settings.policy == "/etc/pgveil/policy/policy.yaml"
    assert settings.upstream == "postgresql://catalog@db:5432/app"
