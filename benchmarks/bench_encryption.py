"""The cost of encryption at rest (issue 24): the data stage and a training run with
`governance.encryption` on (A) against the same runs with it off (B).

    python benchmarks/bench_encryption.py          (or: make bench NAME=encryption)

Written before the first run (protocol item 9).

- **Problem.** The Acme corpus (benchmarks/common.py's ACME_DATA: faq.csv, support_chats.jsonl,
  the handbook; max_seq_len 512), `preset:tiny-llama` (byte-level tokenizer, random weights),
  LoRA r=8 on all linear layers; training: 1 worker, batch 4, 40 steps, evaluation at step 40,
  logging every 10. Each sample is one `raylab run CONFIG --until train` in a fresh process
  with its own embedded Ray and a fresh run directory (so the data stage's cache never
  skips), each side with its own $RAYLAB_HOME (its preset materialised, sealed or not, by the
  untimed warm-up).
- **A:** `governance.encryption: {enabled: true, provider: local}` (a key ring in the
  benchmark's temporary directory): every shard, tokenizer, checkpoint, adapter and report
  sealed (AES-256-GCM, a data key per file), every read opened. **B:** the same config with
  encryption off.
- **Metrics.** The data stage's and the train stage's wall seconds as the pipeline itself
  records them (`run.json`'s `stages`: from the stage's start to its end, so Ray's start-up
  and the process's imports are outside both). Lower is better; the figure is A / B, the
  median of the per-pair ratios with its interquartile range.
- **Goal.** The issue asks for the overhead as a ratio and sets no target; none is set here.
  Expected: close to 1 (AES-GCM runs at GB/s; these files are a few MB), the figure is
  recorded whatever it is.
- Repeats: 3 pairs (a sample takes over a minute: protocol item 3), A and B alternating, one
  untimed warm-up sample per side first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

REPEATS = 3


def _config(root: Path, out: Path, encrypted: bool) -> Path:
    cfg = {
        "version": 1, "output_dir": str(out), "offline": True, "data": common.ACME_DATA,
        "model": {"name_or_path": "preset:tiny-llama", "method": "lora",
                  "lora": {"r": 8, "alpha": 16, "target_modules": "all-linear"}},
        "train": {"num_workers": 1, "batch_size": 4, "max_steps": 40, "eval_every": 40, "log_every": 10, "lr": 3e-3},
        "registry": {"model_name": f"bench-encryption-{'a' if encrypted else 'b'}"},
    }
    if encrypted:
        cfg["governance"] = {"encryption": {"enabled": True, "key_file": str(root / "keys" / "ring.json")}}
    path = root / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _sample(root: Path, encrypted: bool, counter: list[int]) -> dict[str, float]:
    counter[0] += 1
    side = "a" if encrypted else "b"
    out = root / f"{side}-{counter[0]}"
    env = {**os.environ, "RAYLAB_HOME": str(root / f"home-{side}"), "RAYLAB_AUDIT_KEY": str(root / "audit.pem")}
    cmd = [sys.executable, "-m", "raylab", "run", str(_config(root, out, encrypted)), "--until", "train"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, cwd=common.REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    from raylab.core import crypto, storage

    if encrypted:  # run.json is sealed like every file the run wrote
        os.environ[crypto.ENV] = crypto.Settings("local", key_file=str(root / "keys" / "ring.json")).to_env()
    try:
        return json.loads(storage.read_text(str(out / "run.json")))["stages"]
    finally:
        os.environ.pop(crypto.ENV, None)


def main() -> None:
    common.require_clean_commit()
    with tempfile.TemporaryDirectory(prefix="bench-enc-") as tmp:
        root, counter, seen = Path(tmp), [0], {}

        def side(encrypted: bool):
            def run() -> float:
                stages = _sample(root, encrypted, counter)
                seen.setdefault(encrypted, []).append(stages)
                return stages["data"] + stages["train"]
            return run

        got = common.alternate(side(True), side(False), REPEATS, warmup=True)
        timed = {k: v[1:] for k, v in seen.items()}  # the first of each side was the warm-up
        records = []
        for stage in ("data", "train"):
            records.append(common.point(
                f"{stage} stage wall seconds, encryption on vs off", "s",
                ("encrypted", [s[stage] for s in timed[True]]), ("plain", [s[stage] for s in timed[False]]),
                higher_is_better=False, warmup=True, load=got["load"], threads="raylab's plan (2 cores)",
                a_settings={"governance.encryption": {"enabled": True, "provider": "local"}},
                b_settings={"governance.encryption": {"enabled": False}},
                problem={"data": "ACME_DATA, max_seq_len 512", "model": "preset:tiny-llama, LoRA r8 all-linear",
                         "train": "1 worker, batch 4, 40 steps"}))
    common.write_results("encryption", records)
    print(json.dumps([{k: r[k] for k in ("name", "ratio", "ratio_q1", "ratio_q3")} for r in records], indent=1))


if __name__ == "__main__":
    main()
