"""Reading deploy/: every manifest, the SLIDR_* variables they set, the metric names the
dashboard and the alert rules query, and the SLIDR_* variables slidr reads (from the
code, not from a list kept by hand)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import yaml

from events.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
PACKAGES = ("events", "features", "data", "models", "stream", "lifecycle", "slidr")

SETTING_NAME = re.compile(r"\bSLIDR_[A-Z0-9_]+\b")
# SLIDR_* names read straight from the environment outside the Settings object.
ENVIRON_READ = re.compile(
    r"""(?:environ\.get|environ\.__getitem__|getenv)\(\s*["'](SLIDR_[A-Z0-9_]+)["']"""
    r"""|environ\[\s*["'](SLIDR_[A-Z0-9_]+)["']\s*\]"""
)
# Prometheus names in a PromQL expression: slidr's all start with slidr_. Recording-rule
# names (with a colon) would be defined, not exported; the rules define none.
METRIC_NAME = re.compile(r"\bslidr_[a-z0-9_]+\b")


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def json_files() -> list[Path]:
    return sorted(DEPLOY.rglob("*.json"))


def documents(path: Path) -> list[dict]:
    """Every YAML document of ``path`` (a file may hold several, separated by ---)."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kubernetes_objects() -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted((DEPLOY / "k8s").glob("*.yaml")) for d in documents(p)]


def settings_slidr_reads() -> set[str]:
    """``SLIDR_<FIELD>`` of every Settings field, plus every name the packages read from
    the environment directly (``os.environ.get("SLIDR_...")`` and the like)."""
    names = {f"SLIDR_{f.name.upper()}" for f in fields(Settings) if not f.name.startswith("_")}
    for package in PACKAGES:
        for source in (REPO / package).rglob("*.py"):
            for match in ENVIRON_READ.finditer(source.read_text()):
                names.add(match.group(1) or match.group(2))
    return names


def _walk(node: object) -> Iterator[object]:
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def variables_set() -> dict[str, set[str]]:
    """SLIDR_* variable -> the files that set it: Kubernetes env entries and ConfigMap
    keys, compose environment maps, Dockerfile ENV lines, the crontab's assignments."""
    found: dict[str, set[str]] = {}

    def note(name: str, path: Path) -> None:
        if name.startswith("SLIDR_"):
            found.setdefault(name, set()).add(str(path.relative_to(REPO)))

    for path, obj in kubernetes_objects():
        if obj.get("kind") == "ConfigMap":
            for key in obj.get("data", {}):
                note(key, path)
        for node in _walk(obj):
            if (
                isinstance(node, dict)
                and "name" in node
                and ("value" in node or "valueFrom" in node)
            ):
                note(str(node["name"]), path)
    compose = DEPLOY / "compose.yaml"
    for service in documents(compose)[0]["services"].values():
        environment = service.get("environment") or {}
        if isinstance(environment, list):  # KEY=VALUE form
            environment = dict(item.split("=", 1) for item in environment)
        for key in environment:
            note(key, compose)
    for dockerfile in (DEPLOY / "docker").glob("*.Dockerfile"):
        for name in re.findall(r"(SLIDR_[A-Z0-9_]+)=", _env_lines(dockerfile)):
            note(name, dockerfile)
    crontab = DEPLOY / "crontab"
    for line in crontab.read_text().splitlines():
        if not line.lstrip().startswith("#"):
            for name in re.findall(r"(SLIDR_[A-Z0-9_]+)=", line):
                note(name, crontab)
    return found


def _env_lines(dockerfile: Path) -> str:
    """The text of a Dockerfile's ENV instructions, continuation lines joined."""
    text = dockerfile.read_text().replace("\\\n", " ")
    return "\n".join(line for line in text.splitlines() if line.strip().startswith("ENV "))


def queried_metrics() -> dict[str, set[str]]:
    """Metric name -> where it is queried: the alert rules' expressions and the
    dashboard's panel targets."""
    found: dict[str, set[str]] = {}
    rules = DEPLOY / "prometheus" / "alerts.yaml"
    for group in documents(rules)[0]["groups"]:
        for rule in group["rules"]:
            for name in METRIC_NAME.findall(rule["expr"]):
                found.setdefault(name, set()).add(f"alert {rule['alert']}")
    for path in (DEPLOY / "grafana" / "dashboards").glob("*.json"):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                for name in METRIC_NAME.findall(target["expr"]):
                    found.setdefault(name, set()).add(f"panel {panel['title']!r}")
    return found


def exported_names(families) -> set[str]:
    """Every sample name a scrape holds (``NAME_bucket``/``_sum``/``_count`` of a
    histogram, ``NAME_total`` of a counter), plus each family's own name."""
    names = set()
    for family in families:
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names
