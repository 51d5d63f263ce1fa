"""Write prometheusrule.yaml: deploy/prometheus/rules.yml wrapped in a prometheus-operator PrometheusRule.

The rules live once, in rules.yml (promtool-tested there); this file is generated from it. Run after editing
rules.yml; tests/deploy/test_k8s.py fails while the two differ:

    make k8s-rules    (or .venv/bin/python scripts/gen_prometheusrule.py)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
OUT = ROOT / "deploy" / "k8s" / "components" / "prometheus" / "prometheusrule.yaml"
HEADER = (
    "# Generated from deploy/prometheus/rules.yml by scripts/gen_prometheusrule.py: edit rules.yml (its comments say\n"
    "# why each rule is what it is), then rerun the script.\n"
)


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (PromQL, descriptions) as literal blocks, as rules.yml writes them."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render(rules_text: str) -> str:
    manifest: dict[str, Any] = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "attnserve", "labels": {"app.kubernetes.io/name": "attnserve"}},
        "spec": yaml.safe_load(rules_text),
    }
    return HEADER + yaml.dump(manifest, Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True)


def main() -> int:
    OUT.write_text(render(RULES.read_text()))
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
