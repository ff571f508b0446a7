"""The metric names a PromQL expression reads, and the names an exporter exposes.

Why: the Grafana dashboard (deploy/grafana/drover.json) and the alert rules
(deploy/prometheus/alerts.yml) are text; a misspelt metric in them does not fail, it draws an
empty panel or never fires. The lab test (tests/lab/test_metrics_prometheus.py) holds every
name they read against a live scrape of a worker and of `drover exporter`.

A small tokenizer, not a PromQL parser: an identifier is a metric name unless it is a
function or aggregation (followed by `(`), a keyword (`by`, `and`, `offset`, ...), a label
name (inside `{...}`, or in the list after `by`/`without`/`on`/`ignoring`/`group_left`/
`group_right`). Grafana's variables (`$job`, `${job}`, `$__rate_interval`) go first, and a
variable query `label_values(METRIC_SELECTOR, LABEL)` yields its selector's names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

_GRAFANA_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+|\[\[\w+\]\]")
_TOKEN = re.compile(
    r"""(?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
      | (?P<number>\d[\w.]*)
      | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
      | (?P<punct>[{}()\[\],])
      | (?P<other>\S)""",
    re.X,
)
KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "inf", "nan"}
    | {"by", "without", "on", "ignoring", "group_left", "group_right"}
    # Aggregations, which may be followed by `by (...)` rather than by `(`.
    | {"sum", "min", "max", "avg", "count", "stddev", "stdvar", "group"}
    | {"topk", "bottomk", "quantile", "count_values"}
)
_LABEL_LISTS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_LABEL_VALUES = re.compile(r"^\s*label_values\((?P<selector>.*),\s*\w+\s*\)\s*$", re.S)
# prometheus_client's sample names for each family type.
_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("_sum", "_count", ""),
}


def metric_names(expr: str) -> set[str]:
    """Every metric name `expr` (PromQL, possibly with Grafana variables) reads."""
    values = _LABEL_VALUES.match(expr)
    if values:
        expr = values.group("selector")
    tokens = [(m.lastgroup, m.group()) for m in _TOKEN.finditer(_GRAFANA_VARIABLE.sub(" ", expr))]
    names: set[str] = set()
    braces = 0
    label_list = False  # the next (...) lists label names
    parens_in_label_list = 0
    for i, (kind, text) in enumerate(tokens):
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if text == "{":
            braces += 1
        elif text == "}":
            braces -= 1
        elif parens_in_label_list:
            parens_in_label_list += {"(": 1, ")": -1}.get(text, 0)
        elif label_list and text == "(":
            label_list, parens_in_label_list = False, 1
        elif kind == "ident" and not braces:
            if text in _LABEL_LISTS:
                label_list = True
            elif text not in KEYWORDS and following != "(":
                names.add(text)
    return names


def dashboard_exprs(dashboard: dict[str, Any]) -> Iterator[str]:
    """Every PromQL query of a Grafana dashboard: its panels' (rows' nested panels too)
    targets, and its query variables."""

    def panels(items: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                yield str(target["expr"])
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable.get("query")
            yield str(query["query"] if isinstance(query, dict) else query)


def exposed_names(exposition: str) -> set[str]:
    """The sample names a scrape (Prometheus text format) exposes, by each family's type:
    a labelled counter or histogram with no child yet still names itself in `# TYPE`."""
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.update(family.name + s for s in _SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names
