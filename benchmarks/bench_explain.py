"""Explanations: `POST /v1/explain` on `raylab serve` (the Explainer deployment) against
captum used directly on the same model in one process (issue 28).

    python benchmarks/bench_explain.py          (or: make bench NAME=explain)

Protocol: benchmarks/README.md (version 1). Written before it was run (item 9):

- **Model.** benchmarks/common.py's `small_llama` (4 layers, hidden 256, byte-level vocabulary,
  random weights, seed 0), registered as a full version; float32, one torch thread on both
  sides (the Explainer replica runs one thread; the baseline sets `torch.set_num_threads(1)`).
- **Work.** For each method and prompt length, one explanation of a fixed 8-token target
  (given, so no generation on either side) after a plain-text prompt of 16, 64 or 128
  byte tokens (random lowercase words, seed 0; the same text on both sides):
  `integrated_gradients` (n_steps 32, per output token with its convergence delta, the pad
  token as baseline), `feature_ablation`, `shapley_sampling` (samples 3).
- **A:** the HTTP request to `raylab serve` (serve.explain.enabled, one Explainer replica
  with 1 CPU), timed at the client from sending to the parsed response.
- **B:** captum 0.9 in this process on the model loaded with `from_pretrained`: for
  integrated gradients `LayerIntegratedGradients` on the input embeddings once per output
  token on that token's log-probability (what captum needs for a convergence delta per
  token), and `LLMAttribution` with `FeatureAblation` / `ShapleyValueSampling` over the
  prompt's tokens with the target teacher-forced.
- **Metric.** Explanations per second (1 / seconds per explanation); 5 pairs per point, A and
  B alternating, one untimed warm-up of each side per point (the Explainer loads the version
  on its first request).
- **Goal** (issue 28): A / B >= 0.9 for every point (serving adds little).

SHAP (added after the points above were measured; its points are new ones, written to
`results/explain_shap.json`, and the points above stay as measured): `python
benchmarks/bench_explain.py --methods shap`. Same model, prompts, target, threads, pairs,
warm-up, metric and goal. **A:** `POST /v1/explain` with method shap and evals 300. **B:**
shap 0.51 used directly as its documentation shows for text generation, in this process:
`shap.Explainer(shap.models.TeacherForcing(model, tokenizer), shap.maskers.Text(tokenizer),
algorithm="partition")` called on the prompt with the target text and max_evals 300 (shap's
own TeacherForcing re-tokenizes the masked text; raylab's feeds the rendered token ids, so A
does not do that work: stated, not equalised). numba's JIT on in both (the warm-up compiles it).
The first run's JSON (at 5797aa5) names B "captum in process" for these points too: a label
bug, fixed after; B ran shap as described here.
"""

from __future__ import annotations

import json
import random
import string
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from bench_serve import Server  # noqa: E402

NAME, PORT, TARGET = "bench-explain", 8340, "ok, yes."
LENGTHS, REPEATS = (16, 64, 128), 5
METHODS = {"integrated_gradients": {"n_steps": 32}, "feature_ablation": {}, "shapley_sampling": {"samples": 3},
           "shap": {"evals": 300}}
DEFAULT_METHODS = ("integrated_gradients", "feature_ablation", "shapley_sampling")  # results/explain.json's


def prompt_of(length: int) -> str:
    rng, words = random.Random(length), []
    while len(" ".join(words)) < length:
        words.append("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randrange(2, 8))))
    return " ".join(words)[:length]


def setup(root: Path) -> tuple[Path, Path]:
    from raylab import config, registry

    base = common.small_llama(root / "model")
    cfg_path = root / "explain.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "version": 1, "offline": True, "output_dir": str(root / "run"),
        "data": {"sources": [{"type": "jsonl", "path": str(root / "x.jsonl")}]},
        "model": {"name_or_path": str(base)}, "registry": {"model_name": NAME},
        "explain": {"max_prompt_tokens": 512, "max_target_tokens": 16, "n_steps": 32, "samples": 3, "baseline": "pad"},
        "serve": {"port": PORT, "cpus_per_replica": 1, "autoscaling": {"min_replicas": 1, "max_replicas": 1},
                  "explain": {"enabled": True, "cpus_per_replica": 1, "max_replicas": 1}}}))
    cfg = config.load(str(cfg_path))
    store = registry.open_store(cfg)
    exp = registry.experiment_id(store, NAME)
    run = registry.log_run(store, exp, name="base", key="bench-explain-base", params={}, history=[], artifacts={}, tags={})
    mv = registry.register(store, cfg, run, str(base), {"identity": "base", "method": "full", "base_model": str(base),
                                                       "metrics": {}})
    registry.set_tags(store, NAME, int(mv.version), {"raylab.gates.status": "passed"})
    registry.promote(store, NAME, int(mv.version))
    return base, cfg_path


def served(url: str, method: str, prompt: str) -> float:
    body = json.dumps({"model": NAME, "prompt": prompt, "target": TARGET, "method": method, **METHODS[method]}).encode()
    req = urllib.request.Request(url + "/v1/explain", body, {"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as resp:
        out = json.loads(resp.read())
    seconds = time.perf_counter() - started
    assert len(out["output_tokens"]) == len(TARGET), out.get("output_tokens")
    return 1.0 / seconds


class Captum:
    """captum on the model in this process, one torch thread."""

    def __init__(self, base: Path):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(1)
        self.tok = AutoTokenizer.from_pretrained(base)
        self.model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()

    def __call__(self, method: str, prompt: str) -> float:
        started = time.perf_counter()
        getattr(self, method)(prompt)
        return 1.0 / (time.perf_counter() - started)

    def integrated_gradients(self, prompt: str) -> None:
        import torch
        from captum.attr import LayerIntegratedGradients

        ids = self.tok(prompt)["input_ids"]
        target = self.tok(TARGET, add_special_tokens=False)["input_ids"]
        for t, token in enumerate(target):
            x = torch.tensor([ids + target[:t]])
            base = x.clone()
            base[0, :len(ids)] = self.tok.pad_token_id

            def logprob(inp, token=token):
                return torch.log_softmax(self.model(input_ids=inp).logits[:, -1].float(), -1)[:, token]

            lig = LayerIntegratedGradients(logprob, self.model.get_input_embeddings())
            lig.attribute(x, baselines=base, n_steps=METHODS["integrated_gradients"]["n_steps"],
                          return_convergence_delta=True, internal_batch_size=METHODS["integrated_gradients"]["n_steps"])

    def _perturb(self, algo, prompt: str, **kwargs) -> None:
        import torch
        from captum.attr import LLMAttribution, TextTokenInput

        torch.manual_seed(0)
        with torch.no_grad():
            LLMAttribution(algo(self.model), self.tok).attribute(
                TextTokenInput(prompt, self.tok, baselines=self.tok.pad_token_id), target=TARGET,
                forward_in_tokens=False, **kwargs)

    def feature_ablation(self, prompt: str) -> None:
        from captum.attr import FeatureAblation

        self._perturb(FeatureAblation, prompt)

    def shapley_sampling(self, prompt: str) -> None:
        from captum.attr import ShapleyValueSampling

        self._perturb(ShapleyValueSampling, prompt, n_samples=METHODS["shapley_sampling"]["samples"])

    def shap(self, prompt: str) -> None:
        import numpy as np
        import shap
        import torch

        explainer = shap.Explainer(shap.models.TeacherForcing(self.model, self.tok), shap.maskers.Text(self.tok),
                                   algorithm="partition")
        with torch.no_grad():
            found = explainer([prompt], [TARGET], max_evals=METHODS["shap"]["evals"], silent=True)
        assert np.isfinite(np.asarray(found.values[0], dtype=np.float64)).all()


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", choices=tuple(METHODS), default=list(DEFAULT_METHODS))
    methods = parser.parse_args().methods
    common.require_clean_commit()
    root = Path(tempfile.mkdtemp(prefix="bench-explain-"))
    base, cfg_path = setup(root)
    captum = Captum(base)
    server = Server("raylab", [sys.executable, "-m", "raylab", "serve", str(cfg_path)], f"http://127.0.0.1:{PORT}", NAME)
    records = []
    try:
        for method, params in ((m, METHODS[m]) for m in methods):
            for length in LENGTHS:
                prompt = prompt_of(length)
                got = common.alternate(lambda m=method, p=prompt: served(server.url, m, p),
                                       lambda m=method, p=prompt: captum(m, p), REPEATS, warmup=True)
                records.append(common.point(
                    f"explanations/s, {method}, {length}-token prompt, 8-token target", "explanations/s",
                    ("raylab serve POST /v1/explain", got["a"]), ("shap in process" if method == "shap" else "captum in process", got["b"]),
                    goal="A / B >= 0.9 (issue 28: serving adds little)", goal_ratio=0.9, warmup=True,
                    load=got["load"], a_settings={"method": method, **params, "prompt_chars": length},
                    b_settings={"method": method, **params, "prompt_chars": length}, threads=1))
    finally:
        server.stop()
    common.write_results("explain" if tuple(methods) == DEFAULT_METHODS else "explain_" + "_".join(methods), records)
    print(json.dumps([{k: r[k] for k in ("name", "ratio", "ratio_q1", "ratio_q3", "met")} for r in records], indent=1))


if __name__ == "__main__":
    main()
