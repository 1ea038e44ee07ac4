"""Synthetic training data (`raylab synth CONFIG`): generators send prompts to an
OpenAI-compatible endpoint from a Ray Data actor pool, answers are parsed strictly and
filtered, and the kept examples are chat JSONL the data stage reads as a source.

    from raylab.synth import run_synth
    facts = run_synth(cfg)        # writes <output_dir>/synth/<generator>.jsonl, datasheet.{json,md}

Modules: stage (the run, the generators grounded_qa, self_instruct and evol_instruct, the
judge), generators (chunks from data runs, indexes and files, seeds, prompts, evaluation
texts), client (the default endpoint, endpoint policy, cache, retries, budget, the actor
pool), parse (the strict answer formats), filters (PII, length, refusal, decontamination,
MinHash + ROUGE-L novelty, Evol-Instruct's eliminator), datasheet. Needs the `synth` extra: pip install 'raylab[synth]'.
docs/synth.md says how to run it.
"""

from __future__ import annotations

from raylab.synth.stage import run_synth

__all__ = ["run_synth"]
