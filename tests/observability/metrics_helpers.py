"""Reading Prometheus exposition text in tests, and starting `backstop metrics`."""

from __future__ import annotations

import socket
import sys
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.processes import Proc

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return parse(response.read().decode())


def exporter(env: dict[str, str], log: Path) -> tuple[Proc, int]:
    port = free_port()
    proc = Proc([sys.executable, "-m", "workers.cli", "metrics", "--port", str(port)], env, log)
    proc.wait_for("metrics.serving")
    return proc, port
