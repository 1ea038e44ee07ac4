"""Two Ray nodes on one machine: node listing, placement and per-node plan checks."""

from __future__ import annotations

import pytest

from raylab import config
from raylab.core import plan

pytestmark = pytest.mark.multinode

BASE = {
    "version": 1,
    "data": {"sources": [{"type": "jsonl", "path": "x.jsonl"}]},
    "model": {"name_or_path": "preset:tiny-llama"},
}


def test_two_nodes_are_seen_and_used(two_node_cluster):
    import ray

    nodes = plan.cluster_nodes()
    assert len(nodes) == 2 and sum(n.cpus for n in nodes) == 4

    @ray.remote(num_cpus=1, resources={"node_b": 0.1})
    def where():
        return ray.get_runtime_context().get_node_id()

    head_id = ray.get_runtime_context().get_node_id()
    assert ray.get(where.remote()) != head_id  # really ran on the second node


def test_plan_checks_each_node_on_a_real_cluster(two_node_cluster):
    nodes = plan.cluster_nodes()
    fits = config.load_dict(BASE, ["train.num_workers=2", "train.cpus_per_worker=1.5"])
    assert plan.make_plan(fits, nodes).problems() == []
    too_big = config.load_dict(BASE, ["train.num_workers=1", "train.cpus_per_worker=3"])
    problems = plan.make_plan(too_big, nodes).problems()
    assert any("one train worker needs 3 CPUs" in p and "largest node has 2 CPUs" in p for p in problems)
