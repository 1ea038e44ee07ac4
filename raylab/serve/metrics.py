"""The endpoint's Prometheus metrics, per model version, through Ray Serve's metrics API.

Each replica records into `ray.serve.metrics` objects (Serve adds its deployment, replica
and application tags); every node's Ray metrics agent exports them on its Prometheus
endpoint next to Serve's own `ray_serve_*` series, as `ray_<name>` (counters gain `_total`,
histograms `_bucket`/`_sum`/`_count`). docs/serving.md, "Monitoring", says where the
endpoint is; cluster/monitoring/grafana-dashboard.json charts these names.

    metrics = Metrics(["requests", "latency_seconds"])   # in a replica's __init__
    metrics.inc("requests", version_tags("acme/3") | {"status": "200"})
    metrics.observe("latency_seconds", 0.42, version_tags("acme/3"))

Tags: `model` (the registry model name, or the plain model's path) and `version` (the
registry version number; "" for a plain model or a request that reached no version).
"""

from __future__ import annotations

import re

PREFIX = "raylab_serve_"
_VERSION_TAGS = ("model", "version")

# name (without PREFIX) -> (kind, description, extra tag keys, histogram boundaries)
METRICS: dict[str, tuple[str, str, tuple[str, ...], tuple[float, ...]]] = {
    "requests": ("counter", "HTTP generation requests answered, by status code", ("status",), ()),
    "errors": ("counter", "generation requests answered with an error (status >= 400), by status code", ("status",), ()),
    "latency_seconds": ("histogram", "time from a request's arrival to its last byte", (),
                        (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)),
    "prompt_tokens": ("counter", "prompt tokens of the requests answered", (), ()),
    "completion_tokens": ("counter", "tokens generated for the requests answered", (), ()),
    "batch_size": ("histogram", "sequences decoded together in a decode step that had this version's rows", (),
                   (1, 2, 4, 8, 16, 32, 64, 128)),
    "queue_depth": ("gauge", "this version's requests waiting for a row in the batch, after the last decode step", (), ()),
    "running": ("gauge", "this version's requests decoding, after the last decode step", (), ()),
    "adapter_loads": ("counter", "versions loaded into a Generator replica (an adapter into its base's engine, "
                      "or a full model)", (), ()),
    "adapter_evictions": ("counter", "versions evicted from a Generator replica's LRU (serve.max_adapters_per_replica)",
                          (), ()),
}

_REF = re.compile(r"(?P<model>.+)/(?P<version>\d+)")


def version_tags(ref: str | None, model: str | None = None) -> dict[str, str]:
    """{"model", "version"} for a registry reference NAME/N; a plain model's path (or a
    request's `model` field that reached no version) is the model with version ""."""
    m = _REF.fullmatch(ref or "")
    if m:
        return {"model": m["model"], "version": m["version"]}
    return {"model": (ref or model or "")[:200], "version": ""}


def exported_names() -> set[str]:
    """Every series name Prometheus sees for these metrics (Ray's `ray_` prefix, a
    counter's `_total`, a histogram's `_bucket`, `_sum` and `_count`)."""
    out = set()
    for name, (kind, *_rest) in METRICS.items():
        full = f"ray_{PREFIX}{name}"
        out |= ({full + "_total"} if kind == "counter" else
                {full + s for s in ("_bucket", "_sum", "_count")} if kind == "histogram" else {full})
    return out


class Metrics:
    """The named METRICS, created in this replica (Ray's metric objects are per process)."""

    def __init__(self, names: list[str]):
        from ray.serve import metrics as sm

        self._m = {}
        for name in names:
            kind, description, extra, boundaries = METRICS[name]
            tags = _VERSION_TAGS + extra
            if kind == "counter":
                self._m[name] = sm.Counter(PREFIX + name, description=description, tag_keys=tags)
            elif kind == "gauge":
                self._m[name] = sm.Gauge(PREFIX + name, description=description, tag_keys=tags)
            else:
                self._m[name] = sm.Histogram(PREFIX + name, description=description, boundaries=list(boundaries),
                                             tag_keys=tags)

    def inc(self, name: str, tags: dict, value: float = 1.0) -> None:
        if value > 0:  # Ray's Counter refuses inc(0) with a ValueError (see generator.count_tokens)
            self._m[name].inc(value, tags=tags)

    def observe(self, name: str, value: float, tags: dict) -> None:
        self._m[name].observe(value, tags=tags)

    def set(self, name: str, value: float, tags: dict) -> None:
        self._m[name].set(value, tags=tags)
