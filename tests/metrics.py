"""A running gateway's /metrics, scraped and parsed with prometheus-client's parser."""

from __future__ import annotations

import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families


def metric_sum(gw: Any, name: str, labels: dict[str, str]) -> float:
    """The sum of the samples called ``name`` whose labels are exactly ``labels``, from
    ``gw``'s metrics endpoint (``[metrics] enabled``)."""
    port = gw.app.metrics_server.server_address[1]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(
        s.value for f in text_string_to_metric_families(text) for s in f.samples
        if s.name == name and s.labels == labels
    )
