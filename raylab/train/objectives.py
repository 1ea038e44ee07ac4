"""The training objective, a seam: what loss an optimizer step minimises (`train.objective`).

    objective = objectives.build(cfg.train.objective, model, cfg, WorkerContext(rank, world, device))
    sums = objective.loss(batch, outputs)      # summed over the batch's target tokens

An objective is any object with `setup(model, cfg, worker_context)`, called once per worker
after the model is loaded (before DDP wraps it and the optimizer is built, so it may add
trainable parameters), and `loss(batch, outputs)`, which turns one micro-batch and the
model's outputs into `loss.Sums`: the loss SUMMED (not averaged) over the batch's target
tokens (labels != -100) and their count. The loop divides by the target count of the whole
accumulation window on every worker (`loss.train_step`), so whatever the objective,
gradients stay token-normalised. Token accuracy, a metric of evaluation, is counted apart
(`loss.forward_sums`).

Shipped: `cross_entropy` (`CrossEntropy`), next-token cross-entropy on the packed rows'
labels, and `distill` (`distill.Distillation`), cross-entropy mixed with the KL to a frozen
teacher's softened distribution, which `raylab optimize` with optimize.distill selects. A
new objective is a class registered under a name, then selected with `train.objective`:

    objectives.register("my_loss", MyLoss)

The driver resolves the name (an unknown one is a UserError naming `train.objective`) and
sends the class itself to the workers, pickled with the loop's config, so it needs no
registration there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from raylab.errors import UserError
from raylab.train import loss
from raylab.train.distill import Distillation


@dataclass(frozen=True)
class WorkerContext:
    """Where an objective runs: this worker's rank, the world size, its torch device."""

    rank: int
    world_size: int
    device: Any


class Objective(Protocol):
    def setup(self, model, cfg, worker_context: WorkerContext) -> None: ...

    def loss(self, batch: dict, outputs) -> loss.Sums: ...


class CrossEntropy:
    """Next-token cross-entropy over the target tokens (labels != -100): `loss.token_sums`."""

    def setup(self, model, cfg, worker_context: WorkerContext) -> None:
        pass

    def loss(self, batch: dict, outputs) -> loss.Sums:
        return loss.token_sums(batch, outputs)


OBJECTIVES: dict[str, type] = {"cross_entropy": CrossEntropy, "distill": Distillation}


def register(name: str, objective: type) -> None:
    """Make `objective` (a class with `setup` and `loss`) selectable as train.objective=`name`."""
    OBJECTIVES[name] = objective


def resolve(name: str) -> type:
    """The objective class registered under `name`."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise UserError(f"train.objective={name!r} is not a known objective; expected one of "
                        f"{', '.join(sorted(OBJECTIVES))} (raylab/train/objectives.py `register` adds one)") from None


def build(objective: str | type, model, cfg, worker_context: WorkerContext) -> Objective:
    """An objective instance, `setup` called once: `objective` is a registered name or a class."""
    instance = (resolve(objective) if isinstance(objective, str) else objective)()
    instance.setup(model, cfg, worker_context)
    return instance
