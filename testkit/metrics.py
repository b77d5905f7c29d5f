"""A server's ``/metrics``, parsed with the Prometheus client's own text parser."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def sample_key(name: str, labels: dict[str, str]) -> str:
    """``name`` or ``name{label="value",...}``, as the sample appears in the exposition."""
    if not labels:
        return name
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


def parse(text: str) -> dict[str, float]:
    """Every sample of a Prometheus text exposition, keyed by :func:`sample_key`."""
    return {sample_key(s.name, s.labels): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def scrape_async(base_url: str, timeout: float = 5.0) -> dict[str, float]:
    """:func:`scrape` for tests that run on an event loop."""
    async with httpx.AsyncClient(timeout=timeout) as http:
        resp = await http.get(base_url.rstrip("/") + "/metrics")
    resp.raise_for_status()
    return parse(resp.text)


def scrape(base_url: str, timeout: float = 5.0) -> dict[str, float]:
    """The samples of ``base_url/metrics``; empty when the server does not answer."""
    try:
        resp = httpx.get(base_url.rstrip("/") + "/metrics", timeout=timeout)
        resp.raise_for_status()
    except httpx.HTTPError:
        return {}
    return parse(resp.text)
