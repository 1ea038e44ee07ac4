"""Continued pre-training: the `pretrain:` section, run by `raylab run` after the data stage.

    pretrain: {max_steps: 300, lr: 3.0e-3}      # in the config; then
    raylab run configs/quickstart.yaml          # data -> pretrain -> tune|train -> ...

A full fine-tune of `model.name_or_path` on every token of the data stage's train split
(prompts and documents alike, `train.loss_on: all`), run by the train stage itself into
`<output_dir>/pretrain/` (so it resumes, and is skipped when already finished with the same
settings; `raylab.train.run_pretrain`). Its `train/final/` then replaces
`model.name_or_path` for train, tune and eval (`resolve`). With a real pre-trained model this
is domain adaptation; the quickstart uses it to turn the random-weight tiny preset into a
stand-in base model that writes words.

With `pretrain.tokenizer` (a preset only) the data stage first trains a BPE tokenizer on the
redacted corpus (raylab/data/vocab.py), and the pre-training starts from the preset built
around it (`build_base`, into `<output_dir>/pretrain/base/`) instead of the byte-level one.
"""

from __future__ import annotations

from raylab import config, models
from raylab.config import RaylabConfig
from raylab.core import runs, storage
from raylab.errors import UserError


def base_dir(cfg: RaylabConfig) -> str:
    return runs.Run(cfg.output_dir).pretrain.train_final


def pretrain_config(cfg: RaylabConfig) -> RaylabConfig:
    """The train-stage config that does the pre-training."""
    p = cfg.pretrain
    raw = cfg.model_dump(mode="json")
    raw.update(output_dir=runs.Run(cfg.output_dir).pretrain.root, tune=None, pretrain=None)
    raw["model"].update(method="full")
    if p.tokenizer is not None:  # the preset, built around the data stage's corpus tokenizer (`build_base`)
        raw["model"].update(name_or_path=runs.Run(cfg.output_dir).pretrain.base)
    raw["train"].update(lr=p.lr, max_steps=p.max_steps, batch_size=p.batch_size, num_workers=p.num_workers,
                        cpus_per_worker=p.cpus_per_worker, loss_on="all", grad_accum=1, early_stopping_patience=None,
                        eval_every=max(1, p.max_steps // 4), checkpoint_every=None, keep_checkpoints=1,
                        log_every=max(1, p.max_steps // 20))  # each report is a Ray Train round trip
    if p.num_workers < 2:  # train.strategy=fsdp shards over 2+ workers; one pre-training worker runs plain
        raw["train"].update(strategy="ddp")
    raw["registry"].update(enabled=False)  # a stand-in base, not a model to ship
    return config.load_dict(raw)


def build_base(cfg: RaylabConfig) -> None:
    """With pretrain.tokenizer: the preset with random weights, sized for the corpus tokenizer
    the data stage trained, at <output_dir>/pretrain/base/ (where the pre-training starts)."""
    if cfg.pretrain is None or cfg.pretrain.tokenizer is None:
        return
    run = runs.Run(cfg.output_dir)
    if not storage.exists(run.tokenizer):
        raise UserError(f"pretrain.tokenizer: no corpus tokenizer at {run.tokenizer}: run `raylab data` (or `raylab run`) "
                        "first; it trains the tokenizer on the redacted corpus")
    models.build_base(cfg.model.name_or_path.removeprefix("preset:"), run.tokenizer, run.pretrain.base)


def missing(cfg: RaylabConfig) -> bool:
    """A pretrain section whose pre-trained base has not been written yet."""
    return (cfg.pretrain is not None and "://" not in cfg.output_dir
            and not storage.exists(runs.model_file(base_dir(cfg), runs.MODEL_CONFIG)))


def resolve(cfg: RaylabConfig) -> RaylabConfig:
    """`cfg` with the pre-trained model as its base (unchanged without a pretrain section)."""
    if cfg.pretrain is None:
        return cfg
    if "://" in cfg.output_dir:  # every worker loads the base with from_pretrained, from a path
        raise UserError(f"pretrain: output_dir {cfg.output_dir} is not a filesystem path; the pre-trained base is "
                        "loaded from <output_dir>/pretrain, so use a local path or a shared mount, or remove pretrain")
    final = base_dir(cfg)
    if not storage.exists(runs.model_file(final, runs.MODEL_CONFIG)):
        raise UserError(f"pretrain: no pre-trained base at {final} yet; run `raylab run` (it pre-trains after the data "
                        "stage) or remove the pretrain section")
    raw = cfg.model_dump(mode="json")
    raw["model"]["name_or_path"] = final
    raw["pretrain"] = None
    return config.load_dict(raw)
