"""The train stage (`raylab train`): fine-tune on the data stage's shards with Ray Train.

    from raylab.train import run_train
    meta = run_train(cfg)             # writes <output_dir>/train/ (see driver.py)

Modules: driver (checks, the TorchTrainer, final/), loop (`train_loop_per_worker`, what each
worker runs), objectives (the train.objective seam), distill (the `distill` objective: KL to a
frozen teacher plus cross-entropy; `compare_to_teacher`), loss (cross-entropy, masks, one optimizer
step, evaluation), checkpoint (what a
resumed run restores), metrics (FLOPs, MFU, the progress line, the loss plot), pretrain (the
`pretrain:` section's config), remote (`train.provider: openai_compatible`; `remote_client` is
its provider's client, which gates also ask for a remote version's prompts). `checkpoint_state`, `checkpoint_problems`,
`load_checkpoint_weights` and `CHECKPOINT_MODEL_DIR` read a saved checkpoint (explain's
influence sums over them).
"""

from __future__ import annotations

from raylab.core.runs import TRAIN_META as META  # final/'s metadata file (raylab_train.json)
from raylab.train.checkpoint import MODEL_DIR as CHECKPOINT_MODEL_DIR
from raylab.train.checkpoint import listed as list_checkpoints
from raylab.train.checkpoint import load_model_weights as load_checkpoint_weights
from raylab.train.checkpoint import problems as checkpoint_problems
from raylab.train.checkpoint import read_state as checkpoint_state
from raylab.train.distill import compare as compare_to_teacher
from raylab.train.distill import load_teacher
from raylab.train.driver import ensure_pretrained, preflight, run_pretrain, run_train
from raylab.train.loop import plan_steps
from raylab.train.loss import attn_impl_of, forward_sums
from raylab.train.pretrain import resolve as with_pretrained_base
from raylab.train.remote import client as remote_client
from raylab.train.remote import where as remote_url

__all__ = ["CHECKPOINT_MODEL_DIR", "META", "attn_impl_of", "checkpoint_problems", "checkpoint_state", "compare_to_teacher", "list_checkpoints", "load_checkpoint_weights", "load_teacher", "ensure_pretrained", "forward_sums", "plan_steps", "preflight", "remote_client", "remote_url", "run_pretrain", "run_train", "with_pretrained_base"]
