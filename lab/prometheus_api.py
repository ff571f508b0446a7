"""Prometheus's HTTP API as the lab's tests read it: instant queries, alerts, targets.

Plain urllib, no client library: the API is three GETs returning JSON, and what a test
asserts is what any operator's tool would get. The environment's HTTP proxy is ignored
(the server is on loopback). A failed request or an API error is a LabError of one line.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from lab.proc import LabError

REQUEST_TIMEOUT = 5.0
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Sample:
    """One element of an instant vector: its labels and value."""

    labels: dict[str, str]
    value: float


@dataclass(frozen=True)
class PrometheusAPI:
    url: str

    def _get(self, path: str, **params: str) -> Any:
        query = f"?{urlencode(params)}" if params else ""
        try:
            with _OPENER.open(f"{self.url}{path}{query}", timeout=REQUEST_TIMEOUT) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:
            try:
                body = json.load(exc)  # the API explains a bad query in its JSON
            except ValueError:
                raise LabError(f"prometheus {path}: HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise LabError(f"prometheus {path}: {exc}") from None
        if body.get("status") != "success":
            raise LabError(f"prometheus {path}: {body.get('error', body)}")
        return body["data"]

    def ready(self) -> bool:
        """Whether the server answers /-/ready (its database open, config loaded)."""
        try:
            with _OPENER.open(f"{self.url}/-/ready", timeout=REQUEST_TIMEOUT) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def query(self, expr: str) -> list[Sample]:
        """An instant query's vector (/api/v1/query); LabError for any other result type."""
        data = self._get("/api/v1/query", query=expr)
        if data["resultType"] != "vector":
            raise LabError(f"prometheus query {expr!r} gave a {data['resultType']}, not a vector")
        return [Sample(r["metric"], float(r["value"][1])) for r in data["result"]]

    def alerts(self, state: str | None = None) -> list[dict[str, Any]]:
        """The alerts the server holds (/api/v1/alerts: labels, annotations, state), those
        in `state` ("pending", "firing") only if given."""
        alerts: list[dict[str, Any]] = self._get("/api/v1/alerts")["alerts"]
        return [a for a in alerts if state is None or a["state"] == state]

    def firing(self, alertname: str) -> list[dict[str, str]]:
        """The labels of each firing alert named `alertname`."""
        return [a["labels"] for a in self.alerts("firing") if a["labels"]["alertname"] == alertname]

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets (/api/v1/targets): labels, health, last error."""
        targets: list[dict[str, Any]] = self._get("/api/v1/targets")["activeTargets"]
        return targets

    def rule_groups(self) -> list[dict[str, Any]]:
        """The loaded rule groups (/api/v1/rules), with each rule's `duration` (its `for:`)."""
        groups: list[dict[str, Any]] = self._get("/api/v1/rules")["groups"]
        return groups
