"""Knowledge distillation as a training objective (`train.objective: distill`): the student
(the model being trained) learns from a frozen teacher's softened next-token distribution and
from the labels,

    L = alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE(student, labels)

summed over the target tokens of a packed micro-batch (labels != -100: the same tokens, the
same shift and the same packed-row masks as the `cross_entropy` objective), so the loop's
token normalisation applies unchanged. T^2 keeps the KL term's gradient on the scale of the
cross-entropy's as T grows (Hinton et al., 2015). The teacher is the merged model `raylab
optimize` saved at `Run(output_dir).teacher`; each Ray Train worker loads it in `setup`,
frozen (no parameter requires grad), in eval mode, and runs it under `torch.no_grad()`, so
gradients reach the student only and DDP (which wraps the student alone) never sees it.

    raylab optimize configs/quickstart.yaml --model acme-assistant/3 optimize.distill.student=preset:tiny-llama

`raylab optimize` (raylab/optimize/distill.py) builds the nested run and calls the train stage
with this objective; `compare` measures teacher and student on the val split afterwards.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raylab.core import runs, storage
from raylab.errors import UserError
from raylab.train import loss


def distill_sums(batch: dict[str, torch.Tensor], student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 temperature: float, alpha: float) -> loss.Sums:
    """The distillation loss summed over the batch's target tokens, and their count. The
    cross-entropy part is `loss.token_sums` itself (so alpha=0 is the `cross_entropy`
    objective exactly); the KL is over the first min(student, teacher) logit columns (a model
    may pad its vocabulary beyond the tokenizer's, by a different amount than the other)."""
    ce = loss.token_sums(batch, _Logits(student_logits))
    target = batch["labels"].long()[:, 1:]
    keep = target != loss.IGNORE
    width = min(student_logits.shape[-1], teacher_logits.shape[-1])
    log_s = F.log_softmax(student_logits[:, :-1][keep][:, :width].float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits[:, :-1][keep][:, :width].float() / temperature, dim=-1)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="sum")  # sum over tokens of sum_v p_t (log p_t - log p_s)
    return loss.Sums(alpha * temperature ** 2 * kl + (1.0 - alpha) * ce.loss, ce.targets, 0)


class _Logits:
    """What `loss.token_sums` reads from a model's outputs."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits


def load_teacher(path: str, dtype: str, device):
    """The merged teacher saved at `path`, frozen: eval mode, no parameter requiring grad."""
    from raylab import models

    teacher = models.load(path, dtype=dtype, with_tokenizer=False).model.to(device)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


class Distillation:
    """The `distill` objective: `setup` loads the teacher on this worker; `loss` runs it on the
    micro-batch the student just saw and returns `distill_sums`. Temperature and alpha come from
    optimize.distill (the nested run's config, written by `raylab optimize`)."""

    teacher = None

    def setup(self, model, cfg, worker_context) -> None:
        d = cfg.optimize.distill
        teacher_dir = runs.Run(cfg.output_dir).teacher
        if d is None or not storage.exists(teacher_dir):
            raise UserError("train.objective=distill: trains a student against a teacher that `raylab optimize CONFIG "
                            "--model REF` with optimize.distill places in its nested run; run that instead of "
                            "`raylab train` (or set train.objective=cross_entropy)")
        self.temperature, self.alpha = d.temperature, d.alpha
        if self.alpha == 0:  # plain cross-entropy (a baseline student): the teacher's memory is not spent
            return
        from raylab.models import resolved_dtype

        dtype, _ = resolved_dtype(cfg.model, worker_context.device)
        self.teacher = load_teacher(teacher_dir, dtype, worker_context.device)
        self.attn_impl = loss.attn_impl_of(self.teacher)

    def loss(self, batch: dict, outputs) -> loss.Sums:
        if self.alpha == 0:  # plain cross-entropy: the teacher's forward pass would be thrown away (not loaded)
            return loss.token_sums(batch, outputs)
        with torch.no_grad():
            teacher_logits = loss.forward(self.teacher, batch, self.attn_impl).logits
        return distill_sums(batch, outputs.logits, teacher_logits, self.temperature, self.alpha)


@torch.no_grad()
def compare(student, teacher, location: str, samples: int, temperature: float, all_tokens: bool = False,
            batch_size: int = 8) -> dict[str, float]:
    """Teacher and student on `samples` packed rows of the split at `location` (the first ones:
    the split is written in a fixed order), per target token: each one's cross-entropy
    (`teacher_loss`, `student_loss`) and the student's KL to the teacher at `temperature`
    (`kl`, unscaled by T^2). `all_tokens`: train.loss_on=all's labels."""
    table = storage.read_table(location, ["input_ids", "labels", "position_ids", "segment_ids"]).slice(0, samples)
    if table.num_rows == 0:
        raise UserError(f"optimize.distill.eval_samples: the split at {location} is empty")
    sums = {"teacher_loss": 0.0, "student_loss": 0.0, "kl": 0.0}
    targets = 0
    for start in range(0, table.num_rows, batch_size):
        part = table.slice(start, batch_size)
        batch = loss.collate({k: part.column(k).to_numpy(zero_copy_only=False) for k in part.column_names}, all_tokens)
        s = loss.forward(student, batch, loss.attn_impl_of(student)).logits
        t = loss.forward(teacher, batch, loss.attn_impl_of(teacher)).logits
        ce_s, ce_t = loss.token_sums(batch, _Logits(s)), loss.token_sums(batch, _Logits(t))
        kl = distill_sums(batch, s, t, temperature, alpha=1.0).loss / temperature ** 2
        sums["student_loss"] += float(ce_s.loss)
        sums["teacher_loss"] += float(ce_t.loss)
        sums["kl"] += float(kl)
        targets += ce_s.targets
    return {k: v / max(targets, 1) for k, v in sums.items()} | {"targets": targets}
