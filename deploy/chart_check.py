"""Render the Helm chart and validate every manifest against the Kubernetes schemas (`make deploy-check`).

Rendering is Helm's own template engine (the Go library, through the `helm-python-sdk` wheel:
the same code as `helm template`, no cluster contacted). Validation: built-in kinds against the
Kubernetes JSON schemas shipped in `kubernetes-validate` (strict: unknown fields are errors), the
custom resources (KubeRay `RayCluster`, prometheus-operator `ServiceMonitor`) against the schemas
in `deploy/schemas/`, whose pod templates and selectors refer to the same Kubernetes definitions.
A manifest of any other kind is an error, never skipped.

    python deploy/chart_check.py [--values FILE]... [--out DIR]

Renders the chart's defaults and the variants in `VARIANTS` (every toggle on and off), prints one
line per manifest and exits 1 if anything fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from helm_python.chart import Chart
from referencing import Registry, Resource

DEPLOY = Path(__file__).resolve().parent
CHART = DEPLOY / "helm" / "ledger-node"
SCHEMAS = DEPLOY / "schemas"
KUBERNETES_VERSION = "1.30.0"
RELEASE = "ledger"
NAMESPACE = "finance-prod"
CUSTOM_SCHEMAS = {
    ("ray.io/v1", "RayCluster"): "raycluster-ray-v1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-v1.json",
}
# Value sets rendered besides the defaults: each toggle of the chart both ways.
VARIANTS: dict[str, dict[str, Any]] = {
    "vault": {"secrets": {"source": "vault"}, "hsm": {"configMap": "cloudhsm-client"}},
    "autoscaling": {"api": {"autoscaling": {"enabled": True}, "allowFrom": [{"podSelector": {}}]}},
    "minimal": {
        "hsm": {"enabled": False},
        "consumer": {"enabled": False},
        "migrations": {"enabled": False},
        "cronjobs": {"check": {"enabled": False}, "exports": {"enabled": False}},
        "monitoring": {"serviceMonitor": {"enabled": False}},
        "networkPolicy": {"enabled": False},
        "api": {"autoscaling": {"enabled": False}},
    },
}


def render(values: dict[str, Any] | None = None) -> dict[str, str]:
    """`helm template` of the chart with `values` over its defaults: template path -> YAML text."""
    chart = Chart.load(str(CHART))
    return chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)


def manifests(rendered: dict[str, str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every non-empty YAML document of the rendered templates, with the template it came from."""
    for template, text in sorted(rendered.items()):
        if template.endswith("NOTES.txt"):
            continue
        for document in yaml.safe_load_all(text):
            if document:
                yield template, document


@cache
def _kubernetes_definitions() -> Resource[Any]:
    version = kubernetes_validate.utils.major_minor(KUBERNETES_VERSION)
    path = f"kubernetes-json-schema/v{version}.0-local-strict/_definitions.json"
    return Resource.from_contents(kubernetes_validate.utils.schema_contents(path, version))


def _custom_validator(schema_file: str) -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMAS / schema_file).read_text())
    registry: Registry[Any] = _kubernetes_definitions() @ Registry()
    return jsonschema.Draft202012Validator(schema, registry=registry)


def validate(manifest: dict[str, Any]) -> list[str]:
    """What is wrong with one manifest (an empty list when it validates)."""
    key = (manifest.get("apiVersion", ""), manifest.get("kind", ""))
    if key in CUSTOM_SCHEMAS:
        validator = _custom_validator(CUSTOM_SCHEMAS[key])
        return [
            f"{'.'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
            for error in validator.iter_errors(manifest)
        ]
    try:
        kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{'.'.join(map(str, error.path)) or '<root>'}: {error.message}"]
    except kubernetes_validate.SchemaNotFoundError as error:
        return [f"no schema: {error.message}"]
    return []


def check(values: dict[str, Any] | None = None, label: str = "defaults") -> list[str]:
    """Render with `values` and validate everything; one line per problem."""
    problems = []
    count = 0
    for template, manifest in manifests(render(values)):
        count += 1
        name = f"{manifest.get('kind')}/{manifest.get('metadata', {}).get('name')}"
        problems += [f"[{label}] {template} {name}: {problem}" for problem in validate(manifest)]
    if count == 0:
        problems.append(f"[{label}] the chart rendered no manifest")
    return problems


def main(argv: list[str] | None = None) -> int:
    """Check the defaults, the variants and any `--values` files; write the renders to `--out`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--values", type=Path, action="append", default=[], help="extra values file")
    parser.add_argument("--out", type=Path, default=None, help="write each render here as one YAML file")
    args = parser.parse_args(argv)
    sets = {"defaults": {}, **VARIANTS}
    sets.update({str(path): yaml.safe_load(path.read_text()) or {} for path in args.values})
    problems: list[str] = []
    for label, values in sets.items():
        found = check(values, label)
        problems += found
        rendered = list(manifests(render(values)))
        print(f"{label}: {len(rendered)} manifests, {'OK' if not found else f'{len(found)} problem(s)'}")
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            text = yaml.safe_dump_all([m for _, m in rendered], sort_keys=False)
            (args.out / f"{Path(label).stem}.yaml").write_text(text)
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
