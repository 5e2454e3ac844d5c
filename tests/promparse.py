"""Test helpers: scrape amid's /metrics over HTTP and look samples up by name and labels.

    samples = await scrape(server.port)
    assert samples[key("amid_ami_up", server="pbx1")] == 1
    assert total(samples, "amid_sink_dropped_events_total", sink="webhook") == 0
"""

from __future__ import annotations

import asyncio

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["Labels", "Samples", "key", "parse", "scrape", "scrape_text", "total"]

Labels = tuple[tuple[str, str], ...]
Samples = dict[tuple[str, Labels], float]


def key(name: str, **labels: str) -> tuple[str, Labels]:
    """The dictionary key of the sample ``name{labels}`` (labels in any order)."""
    return name, tuple(sorted(labels.items()))


def parse(text: str) -> Samples:
    """Every sample of a Prometheus text exposition, keyed as :func:`key` builds keys."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            sample_key = key(sample.name, **sample.labels)
            assert sample_key not in samples, f"duplicate series {sample_key}"
            samples[sample_key] = sample.value
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels`` (e.g. every reason)."""
    wanted = set(labels.items())
    return sum(value for (sample_name, sample_labels), value in samples.items()
               if sample_name == name and wanted <= set(sample_labels))


async def scrape_text(port: int, host: str = "127.0.0.1", *, timeout: float = 5.0) -> str:
    """GET ``/metrics`` and return the body; asserts HTTP 200."""
    async with asyncio.timeout(timeout), aiohttp.ClientSession() as session, \
            session.get(f"http://{host}:{port}/metrics") as response:
            assert response.status == 200, response.status
            return await response.text()


async def scrape(port: int, host: str = "127.0.0.1", *, timeout: float = 5.0) -> Samples:
    """Scrape ``/metrics`` on ``host:port`` and return ``{(name, labels): value}``."""
    return parse(await scrape_text(port, host, timeout=timeout))
