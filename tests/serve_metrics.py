"""The serving tests' view of Prometheus: every node's Ray metrics agent page and one series'
sum, as a scraper would read them.

    page = prometheus()
    series(page, "ray_raylab_serve_requests_total", model="acme", version="1", status="200")
"""

from __future__ import annotations

import re
import urllib.request


def prometheus() -> str:
    """Every node's Ray metrics agent's Prometheus page (the session's Ray, embedded)."""
    import ray

    ports = {n["MetricsExportPort"] for n in ray.nodes() if n["Alive"]}
    return "".join(urllib.request.urlopen(f"http://127.0.0.1:{p}/metrics", timeout=10).read().decode() for p in ports)


def series(page: str, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 when there is none)."""
    total = 0.0
    for line in page.splitlines():
        if line.startswith(name + "{"):
            found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', line[len(name) + 1:line.rindex("}")]))
            if all(found.get(k) == v for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total
