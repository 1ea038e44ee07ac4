"""`raylab export RUN --merge OUT`: the trained model as one plain Hugging Face directory.

    raylab export runs/quickstart --merge exported/acme      # adapter merged into the base
    raylab export runs/quickstart exported/acme-adapter      # the adapter as trained
    raylab export acme-assistant@production --merge out/ --dtype bfloat16   # a registry version, bf16 weights

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


DTYPES = ("float32", "bfloat16", "float16")


def export(run: str, out: str, merge: bool = False, store: registry.Store | None = None, dtype: str | None = None) -> Path:
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    src = final_dir(run, store)
    dst = Path(out).expanduser().resolve()
    if dst.exists() and any(dst.iterdir()):
        raise UserError(f"export target {dst} exists and is not empty; choose a new directory")
    adapter = (src / runs.ADAPTER_CONFIG).exists()
    if adapter and not merge and dtype is not None:
        raise UserError(f"--dtype {dtype}: {run} is an adapter; its dtype follows the base it is loaded onto. Add --merge "
                        "to write a merged model in that dtype")
    if dtype is None and (not merge or not adapter):
        storage.copy_dir(str(src), str(dst))
        log.info(f"export: copied {'adapter' if adapter else 'full model'} {src} -> {dst}")
        return dst
    inf = load(str(src), dtype="float32")  # src is a local directory here: the adapter onto its base
    model = inf.model.merge_and_unload() if adapter else inf.model
    if dtype is not None:
        import torch

        model = model.to(getattr(torch, dtype))
    storage.save_pretrained(model, str(dst), safe_serialization=True)
    storage.save_pretrained(inf.tokenizer, str(dst))
    meta_path = src / runs.TRAIN_META
    meta = json.loads(storage.read_text(str(meta_path))) if meta_path.exists() else {}
    if adapter:  # what it was trained from, for `identify` (a registered adapter may carry no metadata)
        meta.setdefault("base_model", inf.base)
    extra = {"merged_from": str(src), "merged_base": inf.base} if adapter else {"exported_from": str(src)}
    storage.write_text(str(dst / runs.TRAIN_META),
                       json.dumps(meta | extra | {"export_dtype": dtype or "float32"}, indent=2) + "\n")
    log.info(f"export: {'merged ' + str(src) + ' into ' + inf.base if adapter else str(src)} -> {dst} ({dtype or 'float32'})")
    return dst
