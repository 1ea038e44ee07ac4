"""`raylab export RUN --merge OUT`: the trained model as one plain Hugging Face directory.

    raylab export runs/quickstart --merge exported/acme      # adapter merged into the base
    raylab export runs/quickstart exported/acme-adapter      # the adapter as trained

RUN is a run directory (its train/final/ is used), a train/final/ directory itself, a
config file (its output_dir), or a registry version NAME/VERSION or NAME@ALIAS (fetched with
its checksums verified; an existing local path of that shape stays a path, as before). The merge loads the base model in float32 and folds the
adapter in (`merge_and_unload`), so a quantised (QLoRA) run is merged onto full-precision
weights; quantise the merged model afterwards if needed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from raylab import config, registry
from raylab.core import runs, storage
from raylab.errors import UserError
from raylab.models.inference import is_registry_ref, load, locate

log = logging.getLogger(__name__)


def final_dir(run: str, store: registry.Store | None = None) -> Path:
    if is_registry_ref(run) and not Path(run).expanduser().exists():
        return Path(locate(run, store))
    p = Path(run).expanduser().resolve()
    if p.is_file() and p.suffix in (".yaml", ".yml"):
        p = Path(config.load(p).output_dir)
    for candidate in (p, p / runs.FINAL_DIR, Path(runs.Run(str(p)).train_final)):
        if (candidate / runs.ADAPTER_CONFIG).exists() or (candidate / runs.MODEL_CONFIG).exists():
            return candidate
    raise UserError(f"{run}: no trained model there; expected a run directory with train/final/ "
                    "(run `raylab train CONFIG` first), a train/final/ directory, a config file, "
                    "or a registry version NAME/VERSION or NAME@ALIAS")


def export(run: str, out: str, merge: bool = False, store: registry.Store | None = None) -> Path:
    src = final_dir(run, store)
    dst = Path(out).expanduser().resolve()
    if dst.exists() and any(dst.iterdir()):
        raise UserError(f"export target {dst} exists and is not empty; choose a new directory")
    adapter = (src / runs.ADAPTER_CONFIG).exists()
    if not merge or not adapter:
        storage.copy_dir(str(src), str(dst))
        log.info(f"export: copied {'adapter' if adapter else 'full model'} {src} -> {dst}")
        return dst
    inf = load(str(src), dtype="float32")  # src is a local directory here: the adapter onto its base
    base_path = inf.base
    merged = inf.model.merge_and_unload()
    storage.save_pretrained(merged, str(dst), safe_serialization=True)
    storage.save_pretrained(inf.tokenizer, str(dst))
    meta_path = src / runs.TRAIN_META
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    storage.write_text(str(dst / runs.TRAIN_META),
                       json.dumps(meta | {"merged_from": str(src), "merged_base": base_path}, indent=2) + "\n")
    log.info(f"export: merged {src} into {base_path} -> {dst}")
    return dst
