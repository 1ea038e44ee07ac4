"""Monitoring a served version (`raylab monitor CONFIG`): drift of the served prompts from the
training data. The per-version Prometheus metrics are recorded by the endpoint itself
(raylab/serve/metrics.py); docs/serving.md, "Monitoring", covers both.

    from raylab.monitor import run_monitor, summary
    report = run_monitor(cfg)        # {"statistics": {"length", "tokens"[, "embedding"]}, "overall", "drifted", ...}
    print(summary(report))

Modules: drift (the statistics: Jensen-Shannon divergences of length and token
distributions, the embeddings' centroid distance), stage (reading the sample and the
records, the report).
"""

from __future__ import annotations

from raylab.monitor.stage import run_monitor, summary

__all__ = ["run_monitor", "summary"]
