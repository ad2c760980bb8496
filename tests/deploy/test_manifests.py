"""deploy/ without Docker or a cluster: every manifest parses, sets only SLIDR_* variables
that slidr reads, and agrees with the others (probe paths and port, the scaler's group,
topic and replica cap, the datasource the dashboard names). The metric names the
dashboard and the rules query are checked against a running worker in
test_running_worker.py."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib

import pytest

from stream.kafka import CLICKS
from tests.deploy.manifests import (
    DEPLOY,
    REPO,
    documents,
    json_files,
    kubernetes_objects,
    queried_metrics,
    settings_slidr_reads,
    variables_set,
    yaml_files,
)


def by_kind(kind: str) -> dict:
    matches = [obj for _path, obj in kubernetes_objects() if obj["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}, found {len(matches)}"
    return matches[0]


def configmap() -> dict[str, str]:
    return by_kind("ConfigMap")["data"]


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_parses(path) -> None:
    assert documents(path), f"{path} holds no document"


@pytest.mark.parametrize("path", json_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_json_file_parses(path) -> None:
    assert json.loads(path.read_text())


def test_every_kubernetes_object_is_named_and_typed() -> None:
    objects = kubernetes_objects()
    assert {obj["kind"] for _p, obj in objects} >= {
        "ConfigMap",
        "Service",
        "StatefulSet",
        "PodDisruptionBudget",
        "ScaledObject",
        "Deployment",
        "CronJob",
    }
    for path, obj in objects:
        assert obj.get("apiVersion") and obj.get("kind"), path
        assert obj.get("metadata", {}).get("name"), path


def test_every_slidr_variable_a_manifest_sets_is_one_slidr_reads() -> None:
    known = settings_slidr_reads()
    set_by = variables_set()
    # The test reads what it should: the files that set the most settings are seen.
    assert {"SLIDR_KAFKA_BOOTSTRAP", "SLIDR_REDIS_URL", "SLIDR_METRICS_HOST"} <= set_by.keys()
    unknown = {name: sorted(files) for name, files in set_by.items() if name not in known}
    assert not unknown, f"set in deploy/ but never read by slidr: {unknown}"


def test_the_probes_use_the_health_endpoints_on_the_metrics_port() -> None:
    worker = by_kind("StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in worker["env"]}
    port = next(p for p in worker["ports"] if p["name"] == "metrics")["containerPort"]
    assert int(env["SLIDR_METRICS_PORT"]) == port
    assert env["SLIDR_METRICS_HOST"] == "0.0.0.0"  # the kubelet probes the pod IP
    assert worker["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert worker["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert worker[probe]["httpGet"]["port"] in ("metrics", port)


def test_the_scaler_follows_the_workers_group_and_never_outnumbers_partitions() -> None:
    scaled = by_kind("ScaledObject")["spec"]
    statefulset = by_kind("StatefulSet")
    assert scaled["scaleTargetRef"]["kind"] == "StatefulSet"
    assert scaled["scaleTargetRef"]["name"] == statefulset["metadata"]["name"]
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "kafka"
    settings = configmap()
    assert trigger["metadata"]["consumerGroup"] == settings["SLIDR_GROUP_ID"]
    assert trigger["metadata"]["topic"] == CLICKS
    assert trigger["metadata"]["bootstrapServers"] == settings["SLIDR_KAFKA_BOOTSTRAP"]
    assert int(trigger["metadata"]["lagThreshold"]) > 0
    assert trigger["metadata"]["allowIdleConsumers"] == "false"
    assert scaled["maxReplicaCount"] <= int(settings["SLIDR_PARTITIONS"])
    assert scaled["minReplicaCount"] <= scaled["maxReplicaCount"]


def test_the_disruption_budget_and_service_select_the_workers() -> None:
    labels = by_kind("StatefulSet")["spec"]["template"]["metadata"]["labels"]
    pdb = by_kind("PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert pdb.get("maxUnavailable") == 1 or pdb.get("minAvailable")
    service = by_kind("Service")
    assert service["spec"]["selector"].items() <= labels.items()
    assert by_kind("StatefulSet")["spec"]["serviceName"] == service["metadata"]["name"]


def test_compose_runs_kafka_in_kraft_mode_beside_the_whole_stack() -> None:
    services = documents(DEPLOY / "compose.yaml")[0]["services"]
    assert {"kafka", "redis", "worker", "monitor", "prometheus", "grafana"} <= services.keys()
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert "controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"]
    assert not any("zookeeper" in name for name in services)
    mounts = " ".join(services["prometheus"]["volumes"])
    assert "alerts.yaml" in mounts
    prometheus = documents(DEPLOY / "prometheus" / "prometheus.yml")[0]
    assert prometheus["rule_files"] == ["/etc/prometheus/alerts.yaml"]
    assert "provisioning" in " ".join(services["grafana"]["volumes"])


def test_the_dashboard_reads_the_provisioned_datasource() -> None:
    (source,) = documents(DEPLOY / "grafana/provisioning/datasources/prometheus.yaml")[0][
        "datasources"
    ]
    dashboard = json.loads((DEPLOY / "grafana/dashboards/slidr-worker.json").read_text())
    titles = {panel["title"] for panel in dashboard["panels"]}
    for wanted in ("Throughput", "Consumer lag", "End-to-end latency", "IVR per slice"):
        assert any(title.startswith(wanted) for title in titles), wanted
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]


def test_the_alert_rules_cover_lag_degradation_ivr_and_silence() -> None:
    names = {
        rule["alert"]
        for group in documents(DEPLOY / "prometheus/alerts.yaml")[0]["groups"]
        for rule in group["rules"]
    }
    assert {
        "SlidrConsumerLagGrowing",
        "SlidrDegradedDecisions",
        "SlidrIvrDeviation",
        "SlidrNoDecisions",
    } <= names
    assert queried_metrics(), "no metric names found in the rules and the dashboard"


def test_the_worker_image_leaves_out_the_train_extra() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    train = {dep.split("=")[0].split(">")[0] for dep in project["optional-dependencies"]["train"]}
    assert "torch" in train
    assert not any(dep.startswith("torch") for dep in project["dependencies"])
    worker = (DEPLOY / "docker/worker.Dockerfile").read_text()
    assert "[train]" not in worker and "torch" not in worker.replace("no torch", "")
    assert "'.[train]'" in (DEPLOY / "docker/train.Dockerfile").read_text()
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    assert "**" in ignored and "!pyproject.toml" in ignored  # only what pip needs


# The train extra's packages, made unimportable: what the worker image lacks.
_WITHOUT_TRAIN = """
import importlib.abc, sys
class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "scipy", "cvxpy", "onnx", "matplotlib"}:
            raise ModuleNotFoundError(f"No module named {name!r} (worker image)")
sys.meta_path.insert(0, NotInstalled())
import stream.app, lifecycle.monitor, slidr.cli
for command in ("worker", "monitor", "produce"):
    try:
        slidr.cli.main([command, "--help"])
    except SystemExit as done:
        assert done.code == 0, (command, done.code)
"""


def test_the_worker_images_commands_run_without_the_train_extra() -> None:
    """``slidr worker``/``monitor``/``produce`` import nothing from the train extra, so
    the slim image (deploy/docker/worker.Dockerfile) can run them."""
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TRAIN],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
