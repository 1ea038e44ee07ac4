"""`raylab export RUN --merge OUT`: the trained model as one plain Hugging Face directory.

    raylab export runs/quickstart --merge exported/acme      # adapter merged into the base
    raylab export runs/quickstart exported/acme-adapter      # the adapter as trained

RUN is a run directory (its train/final/ is used), a train/final/ directory itself, or a
config file (its output_dir). The merge loads the base model in float32 and folds the
adapter in (`merge_and_unload`), so a quantised (QLoRA) run is merged onto full-precision
weights; quantise the merged model afterwards if needed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from raylab import config
from raylab.core import runs, storage
from raylab.errors import UserError

log = logging.getLogger(__name__)


def final_dir(run: str) -> Path:
    p = Path(run).expanduser().resolve()
    if p.is_file() and p.suffix in (".yaml", ".yml"):
        p = Path(config.load(p).output_dir)
    for candidate in (p, p / runs.FINAL_DIR, Path(runs.Run(str(p)).train_final)):
        if (candidate / runs.ADAPTER_CONFIG).exists() or (candidate / runs.MODEL_CONFIG).exists():
            return candidate
    raise UserError(f"{run}: no trained model there; expected a run directory with train/final/ "
                    "(run `raylab train CONFIG` first), a train/final/ directory, or a config file")


def export(run: str, out: str, merge: bool = False) -> Path:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = final_dir(run)
    dst = Path(out).expanduser().resolve()
    if dst.exists() and any(dst.iterdir()):
        raise UserError(f"export target {dst} exists and is not empty; choose a new directory")
    adapter = (src / runs.ADAPTER_CONFIG).exists()
    if not merge or not adapter:
        storage.copy_dir(str(src), str(dst))
        log.info(f"export: copied {'adapter' if adapter else 'full model'} {src} -> {dst}")
        return dst
    base_path = json.loads((src / runs.ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, src).merge_and_unload()
    storage.save_pretrained(merged, str(dst), safe_serialization=True)
    storage.save_pretrained(AutoTokenizer.from_pretrained(src), str(dst))
    meta_path = src / runs.TRAIN_META
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    storage.write_text(str(dst / runs.TRAIN_META),
                       json.dumps(meta | {"merged_from": str(src), "merged_base": base_path}, indent=2) + "\n")
    log.info(f"export: merged {src} into {base_path} -> {dst}")
    return dst
