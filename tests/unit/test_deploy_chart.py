"""The Helm chart under deploy/: rendered by Helm's engine, every manifest valid, the wiring right.

`deploy/chart_check.py` is what `make deploy-check` runs; these tests run it on the defaults and
on every variant, show that its validation rejects what a cluster would reject, and pin what an
operator relies on: shard pods offer the resource the node asks for, the API and jobs run the
commands that exist, the network policy opens only the API port, secrets come from Vault or a
Secret, and the signer's PKCS#11 settings use the names the node reads.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from node.cli import _parser

REPO = Path(__file__).resolve().parents[2]


def _load_chart_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("chart_check", REPO / "deploy" / "chart_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["chart_check"] = module
    spec.loader.exec_module(module)
    return module


chart_check = _load_chart_check()


def rendered(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return [manifest for _, manifest in chart_check.manifests(chart_check.render(values))]


def by_kind(manifests: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in manifests if m["kind"] == kind]


def named(manifests: list[dict[str, Any]], kind: str, suffix: str) -> dict[str, Any]:
    (found,) = [m for m in by_kind(manifests, kind) if m["metadata"]["name"].endswith(suffix)]
    return found


def containers(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    spec = manifest["spec"]
    if manifest["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec["template"]["spec"]["containers"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("variant", ["defaults", *chart_check.VARIANTS])
def test_every_rendered_manifest_validates_against_the_kubernetes_schemas(variant: str) -> None:
    """Tried: `helm template` of the chart (defaults and each variant: Vault, autoscaling, everything
    off) with every manifest checked against the Kubernetes 1.30 schemas (strict) and the vendored
    RayCluster/ServiceMonitor CRD schemas; no problem is reported."""
    assert chart_check.check(chart_check.VARIANTS.get(variant), variant) == []


def test_the_chart_renders_every_piece_of_the_deployment() -> None:
    """Tried: listing the kinds the chart renders with autoscaling on; the RayCluster, API and consumer
    Deployments, HPA, migration Job, check and export CronJobs, NetworkPolicies, ServiceMonitor and
    the two PodDisruptionBudgets are all there."""
    manifests = rendered(chart_check.VARIANTS["autoscaling"])
    kinds = {m["kind"] for m in manifests}
    assert kinds >= {
        "RayCluster", "Deployment", "Service", "HorizontalPodAutoscaler", "Job", "CronJob",
        "NetworkPolicy", "ServiceMonitor", "PodDisruptionBudget", "ConfigMap",
    }  # fmt: skip
    assert {m["metadata"]["name"] for m in by_kind(manifests, "Deployment")} == {
        "ledger-api",
        "ledger-consumer",
    }
    assert {m["metadata"]["name"] for m in by_kind(manifests, "CronJob")} == {"ledger-check", "ledger-export"}
    assert len(by_kind(manifests, "PodDisruptionBudget")) == 2
    hpa = by_kind(manifests, "HorizontalPodAutoscaler")[0]["spec"]
    assert hpa["minReplicas"] >= 2
    assert {m["type"] for m in hpa["metrics"]} == {"Resource", "Pods"}  # CPU and request latency


def test_validation_rejects_what_the_api_server_would_reject() -> None:
    """Tried: breaking rendered manifests the way a template bug would (a worker group without its
    name, a misspelt container field, a port given as text, a ServiceMonitor without a selector, a
    kind with no schema); each is reported, so the check cannot pass by validating nothing."""
    manifests = rendered()
    ray = copy.deepcopy(by_kind(manifests, "RayCluster")[0])
    del ray["spec"]["workerGroupSpecs"][0]["groupName"]
    assert any("groupName" in p for p in chart_check.validate(ray))
    api = copy.deepcopy(named(manifests, "Deployment", "-api"))
    containers(api)[0]["imagePullPolicyy"] = "Always"
    assert chart_check.validate(api)
    api = copy.deepcopy(named(manifests, "Deployment", "-api"))
    containers(api)[0]["ports"][0]["containerPort"] = "eighty"
    assert chart_check.validate(api)
    monitor = copy.deepcopy(by_kind(manifests, "ServiceMonitor")[0])
    del monitor["spec"]["selector"]
    assert any("selector" in p for p in chart_check.validate(monitor))
    unknown = {"apiVersion": "example.com/v1", "kind": "Gadget", "metadata": {"name": "x"}, "spec": {}}
    assert chart_check.validate(unknown)


def test_shard_pods_offer_the_resource_the_node_places_shards_with() -> None:
    """Tried: the shard worker group's `ray start` resources (as KubeRay passes them through a shell)
    and the node's LEDGER_RAY_SHARD_RESOURCE; they name the same resource, the head offers none and
    runs no tasks, and enough shard capacity survives the loss of one pod."""
    values = {"ray": {"shardResource": "ledger_shard", "shardWorkers": {"shardsPerPod": 3, "replicas": 3}}}
    manifests = rendered(values)
    ray = by_kind(manifests, "RayCluster")[0]["spec"]
    (group,) = ray["workerGroupSpecs"]
    offered = json.loads(json.loads(group["rayStartParams"]["resources"]))
    assert offered == {"ledger_shard": 3}
    assert "resources" not in ray["headGroupSpec"]["rayStartParams"]
    assert ray["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    config = by_kind(manifests, "ConfigMap")[0]["data"]
    assert config["LEDGER_RAY_SHARD_RESOURCE"] == "ledger_shard"
    assert config["LEDGER_RAY_SHARD_RESOURCE_AMOUNT"] == "1"
    defaults = chart_check.render({})
    assert "ledger_shard" in defaults["ledger-node/templates/raycluster.yaml"]


def _run_line(manifest: dict[str, Any]) -> str:
    command = containers(manifest)[0]["command"]
    assert command[:2] == ["/bin/sh", "-c"]
    return str(command[2])


def test_containers_run_ledger_node_commands_that_exist() -> None:
    """Tried: parsing each container's `ledger-node ...` line with the real CLI parser; serve joins the
    Ray cluster through its local raylet with the shard count, and consume, migrate, check and export
    all parse, so a renamed flag breaks this test rather than a rollout."""
    manifests = rendered()
    lines = {
        "api": _run_line(named(manifests, "Deployment", "-api")),
        "consumer": _run_line(named(manifests, "Deployment", "-consumer")),
        "migrate": _run_line(by_kind(manifests, "Job")[0]),
        "check": _run_line(named(manifests, "CronJob", "-check")),
        "export": _run_line(named(manifests, "CronJob", "-export")),
    }
    assert lines["api"].startswith("ray start --address=ledger-head-svc:6379 --num-cpus=0")
    for name, line in lines.items():
        tail = line.split("exec ledger-node ", 1)[1]
        args = _parser().parse_args(tail.split())
        expected = {"api": "serve", "consumer": "consume", "export": "export-journal"}.get(name, name)
        assert args.command == expected
    serve = _parser().parse_args(lines["api"].split("exec ledger-node ", 1)[1].split())
    assert (serve.ray_address, serve.shards, serve.host) == ("auto", 4, "0.0.0.0")
    job = by_kind(manifests, "Job")[0]
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"


def test_network_policy_opens_only_the_api_port_and_keeps_database_and_hsm_to_the_node() -> None:
    """Tried: reading the rendered NetworkPolicies; everything of the release is default-deny, the only
    ingress from outside the node's pods is the API port, and only the node pods (Ray head, shard
    workers, API) reach the HSM and, with the migrate/check jobs, the database."""
    manifests = rendered()
    policies = {m["metadata"]["name"]: m["spec"] for m in by_kind(manifests, "NetworkPolicy")}
    deny = policies["ledger-default-deny"]
    assert deny["policyTypes"] == ["Ingress", "Egress"] and "ingress" not in deny
    api = policies["ledger-api-ingress"]
    assert api["ingress"] == [{"ports": [{"protocol": "TCP", "port": 8080}]}]
    database, hsm = "10.20.0.0/24", "10.30.0.0/28"
    reaching: dict[str, set[str]] = {database: set(), hsm: set()}
    for name, spec in policies.items():
        for rule in spec.get("egress", []):
            for peer in rule.get("to", []):
                cidr = peer.get("ipBlock", {}).get("cidr")
                if cidr in reaching:
                    reaching[cidr].add(name)
    assert reaching == {database: {"ledger-ray-mesh", "ledger-jobs-database"}, hsm: {"ledger-ray-mesh"}}
    mesh = policies["ledger-ray-mesh"]["podSelector"]["matchExpressions"]
    assert {
        "key": "app.kubernetes.io/component",
        "operator": "In",
        "values": ["ray-head", "ray-shards", "api"],
    } in mesh
    external_ingress = [
        (name, rule)
        for name, spec in policies.items()
        for rule in spec.get("ingress", [])
        if name not in {"ledger-ray-mesh", "ledger-consumer-metrics"}
    ]
    assert external_ingress == [("ledger-api-ingress", api["ingress"][0])]


def test_secrets_come_from_vault_or_a_kubernetes_secret() -> None:
    """Tried: rendering with secrets.source=kubernetes and =vault; with a Secret every ledger-node pod
    reads it (envFrom or the consumer's one key) and no Vault annotation appears; with Vault every pod
    carries the agent-injector annotations, sources the rendered file before running, and references
    no Secret at all."""
    plain = rendered()
    for manifest in [*by_kind(plain, "Deployment"), *by_kind(plain, "CronJob"), *by_kind(plain, "Job")]:
        text = json.dumps(manifest)
        assert "ledger-node-secrets" in text and "vault.hashicorp.com" not in text
    vault = rendered(chart_check.VARIANTS["vault"])
    pods = [*by_kind(vault, "Deployment"), *by_kind(vault, "CronJob"), *by_kind(vault, "Job")]
    for manifest in pods:
        text = json.dumps(manifest)
        assert "ledger-node-secrets" not in text
        assert '"vault.hashicorp.com/agent-inject": "true"' in text
        assert _run_line(manifest).startswith(". /vault/secrets/ledger.env && ")
    ray = json.dumps(by_kind(vault, "RayCluster")[0])
    assert ray.count('"vault.hashicorp.com/agent-inject": "true"') == 2  # head and shard workers


def test_pkcs11_settings_use_the_names_the_signer_reads() -> None:
    """Tried: the ConfigMap's PKCS#11 settings against the signer's environment keys; every name is one
    the node hands to the signer actor, the PIN is a file (Secret volume or Vault), and turning the
    HSM off removes them."""
    from actors.runtime import SIGNER_ENV_KEYS

    config = by_kind(rendered(), "ConfigMap")[0]["data"]
    pkcs11 = {key for key in config if key.startswith(("LEDGER_PKCS11_", "LEDGER_SIGNER_"))}
    assert pkcs11 == {
        "LEDGER_PKCS11_MODULE",
        "LEDGER_PKCS11_TOKEN",
        "LEDGER_SIGNER_KEY_LABEL",
        "LEDGER_PKCS11_PIN_FILE",
    }
    assert pkcs11 <= set(SIGNER_ENV_KEYS)
    assert config["LEDGER_PKCS11_PIN_FILE"] == "/var/run/ledger/pkcs11/LEDGER_PKCS11_PIN"
    vault_config = by_kind(rendered(chart_check.VARIANTS["vault"]), "ConfigMap")[0]["data"]
    assert vault_config["LEDGER_PKCS11_PIN_FILE"] == "/vault/secrets/pkcs11-pin"
    off = by_kind(rendered({"hsm": {"enabled": False}}), "ConfigMap")[0]["data"]
    assert not any(key.startswith("LEDGER_PKCS11_") for key in off)


def test_deploy_check_command_passes() -> None:
    """Tried: `python deploy/chart_check.py` as `make deploy-check` runs it; exit status 0 and one OK
    line per value set."""
    assert chart_check.main([]) == 0
