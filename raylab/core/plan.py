"""The resource plan: what raylab will ask Ray for, computed before anything launches.

    plan = make_plan(cfg, planned_nodes(cfg) or cluster_nodes())
    print(plan.render()); check_plan(plan)        # exit 2 with the numbers when it cannot fit

Every stage calls `prepare(cfg, address)` first: the plan is checked against the embedded
Ray's known size before Ray starts, then against the real cluster once connected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from raylab.core.cluster import (
    Connection,
    connect,
    embedded_cpus,
    embedded_gpus,
    mode_of,
    physical_cores,
    resolve_address,
)
from raylab.errors import UserError

if TYPE_CHECKING:
    from raylab.config import RaylabConfig


@dataclass
class Node:
    cpus: float
    gpus: float
    address: str = "local"


@dataclass
class StageAsk:
    """One stage's peak concurrent ask: (what, count, CPUs each, GPUs each) rows."""

    stage: str
    rows: list[tuple[str, int, float, float]]
    fix: str

    @property
    def cpus(self) -> float:
        return sum(n * c for _, n, c, _ in self.rows)

    @property
    def gpus(self) -> float:
        return sum(n * g for _, n, _, g in self.rows)


@dataclass
class Plan:
    nodes: list[Node]
    asks: list[StageAsk]
    torch_threads: int  # per worker of a train run: its own workers share the cores
    trial_concurrency: int | None = None
    trial_threads: int | None = None  # per worker of a sweep's trial: all concurrent trials share them
    notes: list[str] = field(default_factory=list)

    @property
    def cpus(self) -> float:
        return sum(n.cpus for n in self.nodes)

    @property
    def gpus(self) -> float:
        return sum(n.gpus for n in self.nodes)

    def problems(self) -> list[str]:
        out = []
        for ask in self.asks:
            if ask.cpus > self.cpus + 1e-9 or ask.gpus > self.gpus + 1e-9:
                detail = " + ".join(f"{n} {what} x {c:g} CPU" + (f", {g:g} GPU" if g else "") for what, n, c, g in ask.rows)
                out.append(
                    f"{ask.stage} needs {ask.cpus:g} CPUs and {ask.gpus:g} GPUs ({detail}) but the "
                    f"cluster has {self.cpus:g} CPUs and {self.gpus:g} GPUs; {ask.fix}"
                )
                continue
            for what, _, c, g in ask.rows:  # each actor must fit on a single node
                if not any(node.cpus >= c - 1e-9 and node.gpus >= g - 1e-9 for node in self.nodes):
                    big = max(self.nodes, key=lambda n: (n.cpus, n.gpus))
                    out.append(
                        f"{ask.stage}: one {what} needs {c:g} CPUs and {g:g} GPUs but the largest "
                        f"node has {big.cpus:g} CPUs and {big.gpus:g} GPUs; {ask.fix}"
                    )
        return out

    def render(self) -> str:
        lines = [f"cluster: {len(self.nodes)} node(s), {self.cpus:g} CPUs, {self.gpus:g} GPUs"]
        for ask in self.asks:
            rows = ", ".join(f"{n} {what} x {c:g} CPU" + (f" + {g:g} GPU" if g else "") for what, n, c, g in ask.rows)
            lines.append(f"  {ask.stage:<6} {ask.cpus:>6g} CPU {ask.gpus:>4g} GPU   {rows}")
        lines.append(f"  torch threads per train worker: {self.torch_threads}")
        if self.trial_concurrency is not None:
            lines.append(f"  tune trials at once: {self.trial_concurrency}, torch threads per trial worker: {self.trial_threads}")
        lines += [f"  note: {n}" for n in self.notes]
        problems = self.problems()
        lines.append("fits: yes" if not problems else "fits: NO")
        lines += [f"  {p}" for p in problems]
        return "\n".join(lines)


def make_plan(cfg: RaylabConfig, nodes: list[Node], cores: int | None = None) -> Plan:
    """What each stage asks of Ray at its peak, for this config on these nodes."""
    t, d = cfg.train, cfg.data
    cores = cores or physical_cores()
    total_cpus = sum(n.cpus for n in nodes)
    data_tasks = max(1, min(int((total_cpus - d.tokenizer_actors * d.cpus_per_task) / d.cpus_per_task), 4 * len(nodes)))
    ingest = ("data ingest task", 1, d.cpus_per_task, 0.0)
    asks = [
        StageAsk(
            "data",
            [("data task", data_tasks, d.cpus_per_task, 0.0), ("tokenizer actor", d.tokenizer_actors, d.cpus_per_task, 0.0)],
            "lower data.cpus_per_task or data.tokenizer_actors",
        ),
        StageAsk(
            "train",
            [("train worker", t.min_workers, t.cpus_per_worker, t.gpus_per_worker), ingest],
            "lower train.num_workers, train.cpus_per_worker or train.gpus_per_worker"
            + (", or raise ray.num_cpus / ray.num_gpus" if len(nodes) == 1 else ", or add nodes"),
        ),
    ]
    concurrency = None
    notes = []
    if cfg.tune is not None:
        tn = cfg.tune
        per_cpu = tn.cpus_per_trial_driver + t.min_workers * t.cpus_per_worker
        per_gpu = t.min_workers * t.gpus_per_worker
        fit = math.floor((total_cpus - d.cpus_per_task + 1e-9) / per_cpu)
        if per_gpu:
            fit = min(fit, math.floor(sum(n.gpus for n in nodes) / per_gpu + 1e-9))
        concurrency = max(1, min(fit, tn.num_samples, tn.max_concurrent_trials or fit))
        if tn.max_concurrent_trials and tn.max_concurrent_trials > max(fit, 0):
            notes.append(f"tune.max_concurrent_trials={tn.max_concurrent_trials} but only {max(fit, 0)} trial(s) fit at once")
        asks.append(
            StageAsk(
                "tune",
                [
                    ("trial driver", concurrency, tn.cpus_per_trial_driver, 0.0),
                    ("train worker", concurrency * t.min_workers, t.cpus_per_worker, t.gpus_per_worker),
                    ingest,
                ],
                "lower train.num_workers or train.cpus_per_worker, or tune.cpus_per_trial_driver",
            )
        )
    s = cfg.serve
    replicas = max(1, s.autoscaling.min_replicas)
    # serve.rag's Embedder deployment runs beside the model replicas (one at the start)
    embedder = [("embedder replica", 1, s.rag.cpus_per_replica, 0.0)] if s.rag is not None else []
    asks.append(
        StageAsk("serve", [("replica", replicas, s.cpus_per_replica, s.gpus_per_replica), ("ingress", 1, 0.1, 0.0),
                           *embedder],
                 "lower serve.cpus_per_replica or serve.autoscaling.min_replicas"
                 + (" or serve.rag.cpus_per_replica" if embedder else ""))
    )
    if s.autoscaling.max_replicas * s.cpus_per_replica > total_cpus:
        notes.append(f"serve.autoscaling.max_replicas={s.autoscaling.max_replicas} cannot all fit; autoscaling stops at what fits")
    if t.max_workers > t.min_workers and t.max_workers * t.cpus_per_worker > total_cpus:
        notes.append(f"elastic train.num_workers: at most {int(total_cpus // t.cpus_per_worker)} of {t.max_workers} workers fit now")
    # A train run's threads come from its own workers only; a sweep's trials run side by side,
    # so theirs divide the cores among every concurrent trial's workers.
    threads = _threads(t, nodes, cores, t.max_workers)
    trial_threads = _threads(t, nodes, cores, t.max_workers * concurrency) if concurrency else None
    return Plan(nodes, asks, threads, concurrency, trial_threads, notes)


def _threads(t, nodes: list[Node], cores: int, workers_at_once: int) -> int:
    """torch threads per worker when `workers_at_once` workers run together."""
    if t.torch_threads:
        return t.torch_threads
    if len(nodes) == 1:  # embedded or single node: share this machine's cores
        return max(1, cores // workers_at_once)
    return max(1, int(t.cpus_per_worker))


def cluster_nodes() -> list[Node]:
    """Alive nodes of the connected cluster with their CPU/GPU totals."""
    import ray

    return [
        Node(n["Resources"].get("CPU", 0.0), n["Resources"].get("GPU", 0.0), n.get("NodeManagerAddress", "?"))
        for n in ray.nodes()
        if n.get("Alive")
    ]


def planned_nodes(cfg: RaylabConfig, cli_address: str | None = None) -> list[Node] | None:
    """The nodes an embedded Ray would have (known before starting it); None for a cluster."""
    address, _ = resolve_address(cli_address, cfg)
    if mode_of(address) != "embedded":
        return None
    wants_gpu = cfg.train.gpus_per_worker > 0 or cfg.serve.gpus_per_replica > 0 or cfg.ray.num_gpus
    return [Node(embedded_cpus(cfg), embedded_gpus(cfg) if wants_gpu else 0)]


def check_plan(plan: Plan) -> Plan:
    """Raise UserError (exit 2) with the numbers when the plan cannot fit."""
    problems = plan.problems()
    if problems:
        raise UserError("the resource plan does not fit the cluster:\n  " + "\n  ".join(problems))
    return plan


def prepare(cfg: RaylabConfig, address: str | None = None, state_api: bool = False) -> tuple[Connection, Plan]:
    """What every stage calls first: check the plan, connect, check it against the real
    cluster. For an embedded Ray the check happens before Ray starts, so a plan that cannot
    fit is refused (exit 2) before anything is launched."""
    nodes = planned_nodes(cfg, address)
    if nodes is not None:
        check_plan(make_plan(cfg, nodes))
    conn = connect(cfg, address, state_api=state_api)
    return conn, check_plan(make_plan(cfg, cluster_nodes()))
