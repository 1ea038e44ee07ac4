"""`raylab synth CONFIG`: generators -> an OpenAI-compatible endpoint -> strict parsing ->
filters -> runs/<name>/synth/<generator>.jsonl and a datasheet.

    raylab synth configs/synth.yaml          # CLI
    raylab.synth.run_synth(cfg)               # Python; returns the datasheet's facts

1. The endpoint policy is checked first (client.check_policy): nothing is read or sent for a
   remote endpoint the governance section has not allowed.
2. grounded_qa: one request per chunk; each parsed pair is an example that keeps its chunk id.
   self_instruct: rounds of instruction prompts (seed + generated tasks in context) until
   `instructions` new ones are kept (a round that keeps none ends it: the endpoint has nothing
   new to say, or the budget is spent), then one output request per kept instruction.
   evol_instruct: `rounds` rounds; each draws one evolution per instruction of the pool (an
   in-depth method or in-breadth), asks for the evolved instruction, then for its answer;
   the eliminator (filters.evolution_failure, Filters.answer_failure) drops failed ones with
   their reason, and the pool of the next round is the survivors plus the sources of the
   failures (evolved again, by a newly drawn evolution).
3. Requests go out from a Ray Data actor pool (client.py); answers are cached, so a re-run
   sends only what it has no answer for, and the budget stops the run cleanly.
4. Every answer is parsed strictly (parse.py); every example is redacted, then length,
   refusal and decontamination filtered, then novelty filtered (filters.py); with
   `synth.filters.judge`, what is left is graded 1-5 by the endpoint and kept at min_score.
5. The kept examples are chat JSONL (`{"messages": [user, assistant], "generator", ...}`),
   read by the data stage as `{type: jsonl, path: runs/<name>/synth/<generator>.jsonl,
   format: chat}`; the datasheet (datasheet.py) counts every request, rejection and drop.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter

from raylab.config import RaylabConfig
from raylab.core import cluster, events, runs, storage
from raylab.errors import UserError
from raylab.synth import datasheet, generators, parse
from raylab.synth.client import Requests
from raylab.synth.filters import Filters, Novelty, Tally, evolution_failure

log = logging.getLogger(__name__)


def run_synth(cfg: RaylabConfig, address: str | None = None) -> dict:
    """Generate, filter and write the examples; returns the datasheet's facts."""
    with events.stage("synth", run=cfg.output_dir):
        return _run(cfg, address)


def _novelty(cfg: RaylabConfig) -> Novelty:
    f = cfg.synth.filters
    return Novelty(f.novelty, f.num_perm, f.bands, f.ngram, f.recall_sample)


class Generator:
    """One generator's bookkeeping: its requests' outcomes, rejections, drops and kept examples."""

    def __init__(self, name: str, filters: Filters, novelty: Novelty):
        self.name, self.filters, self.novelty = name, filters, novelty
        self.requests = {"asked": 0, "cached": 0, "sent": 0, "ok": 0}
        self.failed, self.rejected, self.dropped = Tally(), Tally(), Tally()
        self.examples: list[dict] = []
        self.instructions: dict | None = None  # self_instruct's instruction step: kept, dropped
        self.evolutions: dict | None = None  # evol_instruct's rounds: evolved per kind, eliminated
        self.judge: dict | None = None  # the judge's grades

    def answers(self, client: Requests, prompts: list[list[dict]]) -> list[str | None]:
        """The completions' texts (None for a failed or unsent request, tallied with its reason)."""
        out = []
        for prompt, answer in zip(prompts, client.complete(prompts), strict=True):
            self.requests["asked"] += 1
            self.requests["cached" if answer.cached else "sent"] += answer.reason != "budget"
            if answer.ok:
                self.requests["ok"] += 1
                out.append(answer.content)
            else:
                self.failed.add(answer.reason, prompt[-1]["content"])
                out.append(None)
        return out

    def parsed(self, text: str | None, parser, *args, step: str = ""):
        """The parsed answer, or None (a rejection is tallied as `<step>_<reason>` when a step is named)."""
        if text is None:
            return None
        try:
            return parser(self.filters.redact(text), *args)
        except parse.Rejected as e:
            self.rejected.add(f"{step}_{e.reason}" if step else e.reason,
                              {"error": str(e), "answer": self.filters.redact(text)[:300]})
            return None

    def offer(self, prompt: str, response: str, novel: bool = True, **meta) -> None:
        """Keep the example unless a filter drops it (prompt and response already redacted)."""
        reason = self.filters.check(prompt, response)
        if reason is None and novel:
            kept, similar, score = self.novelty.offer(prompt)
            if not kept:
                self.dropped.add("novelty", {"prompt": prompt[:300], "similar_to": similar[:300],
                                             "rouge_l": round(score, 3)})
                return
        if reason is not None:
            self.dropped.add(reason, {"prompt": prompt[:300], "response": response[:300]})
            return
        self.examples.append({"messages": [{"role": "user", "content": prompt},
                                           {"role": "assistant", "content": response}],
                              "generator": self.name, **meta})

    def facts(self) -> dict:
        return {"requests": self.requests, "failed": self.failed.as_dict(), "rejected": self.rejected.as_dict(),
                "dropped": self.dropped.as_dict(), "kept": len(self.examples),
                "novelty": {"compared": self.novelty.compared, "candidate_recall": self.novelty.recall()},
                **({"instructions": self.instructions} if self.instructions is not None else {}),
                **({"evolutions": self.evolutions} if self.evolutions is not None else {}),
                **({"judge": self.judge} if self.judge is not None else {})}


def grounded_qa(cfg: RaylabConfig, client: Requests, filters: Filters) -> Generator:
    g = cfg.synth.grounded_qa
    gen = Generator("grounded_qa", filters, _novelty(cfg))
    chunks = generators.read_chunks(g)
    if not chunks:
        raise UserError(f"synth.grounded_qa: no chunk of at least min_chunk_chars={g.min_chunk_chars} characters in "
                        "its data_run or files")
    # the documents go into prompts: redacted first, so no PII leaves for the endpoint
    prompts = [generators.qa_prompt(g, filters.redact(c["text"])) for c in chunks]
    for chunk, text in zip(chunks, gen.answers(client, prompts), strict=True):
        for pair in gen.parsed(text, parse.parse_pairs, g.pairs_per_chunk) or []:
            gen.offer(pair["question"], pair["answer"], chunk_id=chunk["id"])
    return gen


def self_instruct(cfg: RaylabConfig, client: Requests, filters: Filters) -> Generator:
    si = cfg.synth.self_instruct
    gen = Generator("self_instruct", filters, _novelty(cfg))
    seeds = [filters.redact(s) for s in generators.read_seeds(si)]
    for s in seeds:  # the paper's pool starts with the seed tasks: a copy of one is not new
        gen.novelty.offer(s)
    made: list[str] = []
    instructions = Tally()  # instruction-step drops, apart from the examples'
    for round_ in range(si.instructions):  # each round keeps >= 1 or ends the loop
        rng = random.Random(f"{si.seed}:{round_}")  # a re-run builds the same prompts: cache hits
        wanted = si.instructions - len(made)
        prompts = [generators.instruction_prompt(si, seeds, made, rng) for _ in range(-(-wanted // si.per_prompt))]
        before = len(made)
        for text in gen.answers(client, prompts):
            for instruction in gen.parsed(text, parse.parse_instructions, si.per_prompt) or []:
                if len(made) == si.instructions:
                    break
                if not filters.f.min_chars <= len(instruction) <= filters.f.max_chars:
                    instructions.add("length", instruction)
                    continue
                kept, similar, score = gen.novelty.offer(instruction)
                if kept:
                    made.append(instruction)
                else:
                    instructions.add("novelty", {"instruction": instruction[:300], "similar_to": similar[:300],
                                                 "rouge_l": round(score, 3)})
        if len(made) in (before, si.instructions):
            break
    gen.instructions = {"kept": len(made), "dropped": instructions.as_dict()}
    outputs = gen.answers(client, [generators.output_prompt(si, i) for i in made])
    for instruction, text in zip(made, outputs, strict=True):
        example = gen.parsed(text, parse.parse_output)
        if example is not None:
            prompt = f"{instruction}\n\n{example['input']}" if example["input"] else instruction
            gen.offer(prompt, example["output"], novel=False)  # the instruction passed novelty already
    return gen


def evol_instruct(cfg: RaylabConfig, client: Requests, filters: Filters) -> Generator:
    ev = cfg.synth.evol_instruct
    gen = Generator("evol_instruct", filters, _novelty(cfg))
    pool = [filters.redact(s) for s in generators.read_seeds(ev, "synth.evol_instruct")]
    evolved_by_kind: Counter = Counter()
    eliminated = Tally()
    rounds = 0
    for round_ in range(ev.rounds):
        rounds += 1
        rng = random.Random(f"{ev.seed}:{round_}")  # the same pool draws the same evolutions: cache hits
        drawn = [generators.evolution_prompt(ev, i, rng) for i in pool]
        survivors, again = [], []  # (source, kind, evolved); sources whose evolution failed
        for source, (kind, _), text in zip(pool, drawn, gen.answers(client, [m for _, m in drawn]), strict=True):
            evolved = gen.parsed(text, parse.parse_instruction, step="evolution")
            why = None if evolved is None else evolution_failure(source, evolved, ev.copy_markers)
            if why is not None:
                eliminated.add(why, {"from": source[:300], "evolved": evolved[:300], "evolution": kind})
            if evolved is None or why is not None:
                again.append(source)
            else:
                survivors.append((source, kind, evolved))
        answers = gen.answers(client, [generators.evol_answer_prompt(ev, e) for _, _, e in survivors])
        pool = again
        for (source, kind, evolved), text in zip(survivors, answers, strict=True):
            response = gen.parsed(text, parse.parse_response, step="response")
            why = None if response is None else filters.answer_failure(response, ev.short_answer_words)
            if why is not None:
                eliminated.add(why, {"instruction": evolved[:300], "response": response[:300], "evolution": kind})
            if response is None or why is not None:
                pool.append(source)
                continue
            evolved_by_kind[kind] += 1
            pool.append(evolved)  # evolved further next round, whether or not the filters keep this example
            # Not novelty-filtered: each evolution is a deliberate rewrite of the one before it,
            # which ROUGE-L scores as similar by construction (10-20 words added to a short
            # prompt stay above 0.7); the eliminator's no_gain drops rewrites that add nothing.
            gen.offer(evolved, response, novel=False, evolution=kind, round=round_ + 1)
        if client.sent >= client.budget:  # a further round could only count its requests `budget` again
            break
    gen.evolutions = {"rounds": rounds, "evolved": dict(sorted(evolved_by_kind.items())),
                      "eliminated": eliminated.as_dict()}
    return gen


def judge(gen: Generator, client: Requests, filters: Filters, j) -> None:
    """Grade every kept example through the endpoint; keep those at min_score or above. An
    example whose grade is missing (failed request) or malformed is not kept: never scored up."""
    prompts = [generators.judge_prompt(j, e["messages"][0]["content"], e["messages"][1]["content"])
               for e in gen.examples]
    scores: Counter = Counter()
    kept = []
    for example, text in zip(gen.examples, gen.answers(client, prompts), strict=True):
        prompt, response = (m["content"][:300] for m in example["messages"])
        grade = gen.parsed(text, parse.parse_grade, step="judge")
        if grade is None:
            gen.dropped.add("judge_unscored", {"prompt": prompt, "response": response})
            continue
        score, reason = grade
        scores[score] += 1
        if score < j.min_score:
            gen.dropped.add("judge", {"prompt": prompt, "response": response, "score": score, "reason": reason[:300]})
        else:
            kept.append({**example, "judge_score": score})
    gen.examples = kept
    gen.judge = {"min_score": j.min_score, "scores": {str(k): v for k, v in sorted(scores.items())}}


def _run(cfg: RaylabConfig, address: str | None) -> dict:
    s, run = cfg.synth, runs.Run(cfg.output_dir)
    if s.grounded_qa is None and s.self_instruct is None and s.evol_instruct is None:
        raise UserError("synth: no generator configured; add synth.grounded_qa, synth.self_instruct and/or "
                        "synth.evol_instruct")
    client = Requests(cfg, run)  # the endpoint policy, before anything is read
    filters = Filters(s.filters, cfg.data.pii, generators.eval_texts(cfg))
    cluster.connect(cfg, address)
    done = []
    if s.grounded_qa is not None:
        done.append(grounded_qa(cfg, client, filters))
    if s.self_instruct is not None:
        done.append(self_instruct(cfg, client, filters))
    if s.evol_instruct is not None:
        done.append(evol_instruct(cfg, client, filters))
    if s.filters.judge is not None:
        for gen in done:
            judge(gen, client, filters, s.filters.judge)
    outputs = {}
    for gen in done:
        location = run.synth_output(gen.name)
        storage.write_text(location, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in gen.examples))
        outputs[gen.name] = location
    facts = datasheet.build(cfg, done, filters, client, outputs)
    storage.write_text(run.synth_datasheet("json"), json.dumps(facts, indent=1, ensure_ascii=False) + "\n")
    storage.write_text(run.synth_datasheet("md"), datasheet.render(facts))
    log.info("synth: " + "; ".join(f"{g.name} kept {len(g.examples)}" for g in done)
             + f" ({client.sent} request(s) sent, {client.cached} answered from the cache) -> {run.synth}")
    return facts
