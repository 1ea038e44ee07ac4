"""Evol-Instruct and the judge filter against a scripted OpenAI-compatible server on loopback (a
stand-in for a provider, not a model: its answers are fixed per prompt), without Ray: every
request set here fits one batch, which the driver sends itself (client.Requests).

Each seed is planted to meet one rule: an evolution that copies the rewriter's prompt, one that
adds no word, a fenced (not strictly JSON) evolution, a refused answer, a low grade, a malformed
grade, and one that passes everything (the control that shows the rules do not drop all)."""

from __future__ import annotations

import json
import re
import threading

import pytest
from http_helpers import Handler, serving

from raylab import config
from raylab.core import runs
from raylab.synth import datasheet, generators
from raylab.synth.client import Requests
from raylab.synth.filters import Filters
from raylab.synth.stage import evol_instruct, judge

GOOD = "Explain what a purchase order is."
SEEDS = [GOOD,
         "Name a primary colour.",                            # evolution copies '#Rewritten Prompt#'
         "Convert 12 inches to centimetres.",                 # evolution only reorders the words
         "Write a haiku about the warehouse.",                # evolution in a code fence
         "Describe the refund process for damaged widgets.",  # answer: a short refusal
         "Summarise the shipping policy.",                    # judge: 2
         "Describe the badge policy for visitors."]           # judge: 4.5, not a grade
GIVEN = re.compile(r"The given prompt:\n(.*?)\n\nReply", re.S)


def evolved(instruction: str) -> str:
    if "colour" in instruction:
        return f"#Rewritten Prompt#: {instruction}"
    if "inches" in instruction:
        return "Convert to centimetres 12 inches."
    if "haiku" in instruction:
        return "```json\n" + json.dumps({"instruction": instruction + " Use five syllables."}) + "\n```"
    return f"{instruction} Also cover case {len(instruction.split())} with an example."


def answer(prompt: str) -> str:
    if "Prompt Rewriter" in prompt or "Prompt Creator" in prompt:
        text = evolved(GIVEN.search(prompt).group(1))
        return text if text.startswith("```") else json.dumps({"instruction": text})
    if prompt.startswith("You are grading"):
        instruction = prompt.split("Instruction:\n", 1)[1]
        score = 2 if "shipping" in instruction else 4.5 if "badge" in instruction else 5
        return json.dumps({"score": score, "reason": "scripted"})
    instruction = prompt.split("\n\nReply with only", 1)[0]
    if "refund" in instruction:
        return json.dumps({"response": "I'm sorry, I cannot help with that."})
    return json.dumps({"response": f"A careful answer to: {instruction}"})


class Provider(Handler):
    prompts: list = []
    lock = threading.Lock()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        with self.lock:
            self.prompts.append(prompt)
        self.send_json(200, {"choices": [{"message": {"role": "assistant", "content": answer(prompt)}}]})


@pytest.fixture(scope="module")
def provider():
    with serving(Provider) as url:
        yield url


def _cfg(tmp_path, url: str, min_score: int = 4):
    return config.load_dict({
        "version": 1, "output_dir": str(tmp_path / "run"),
        "data": {"sources": [{"type": "jsonl", "path": "x.jsonl"}]}, "model": {"name_or_path": "preset:tiny-llama"},
        "synth": {"endpoint": {"base_url": f"{url}/v1", "model": "provider-model"},
                  "evol_instruct": {"seeds": SEEDS, "rounds": 2}, "batch_size": 64,
                  "filters": {"judge": {"min_score": min_score}}}})


def _evolve(cfg):
    client = Requests(cfg, runs.Run(cfg.output_dir))
    filters = Filters(cfg.synth.filters, cfg.data.pii, [])
    return client, filters, evol_instruct(cfg, client, filters)


def test_evolutions_are_eliminated_by_the_papers_rules_and_the_judge_keeps_the_good_grades(tmp_path, provider):
    Provider.prompts = []
    cfg = _cfg(tmp_path, provider)
    client, filters, gen = _evolve(cfg)
    e = gen.evolutions
    assert e["rounds"] == 2
    assert e["eliminated"]["counts"] == {"copies_prompt": 2, "no_gain": 2, "refusal": 2}  # every round
    assert gen.rejected.counts == {"evolution_not_json": 2}
    # three seeds evolve in round 1, and their evolutions evolve again in round 2
    assert sum(e["evolved"].values()) == len(gen.examples) == 6
    assert set(e["evolved"]) <= set(cfg.synth.evol_instruct.depth_methods) | {generators.BREADTH}
    second = [x["messages"][0]["content"] for x in gen.examples if x["round"] == 2]
    assert [p.count("Also cover case") for p in second] == [2, 2, 2]  # round 2 evolved round 1's output
    assert all("{{" not in p for p in Provider.prompts)  # the templates' braces go out single

    judge(gen, client, filters, cfg.synth.filters.judge)
    kept = [x["messages"][0]["content"] for x in gen.examples]
    assert len(kept) == 2 and all(k.startswith(GOOD) for k in kept)
    assert {x["judge_score"] for x in gen.examples} == {5}
    assert gen.dropped.counts == {"judge": 2, "judge_unscored": 2}
    assert gen.rejected.counts == {"evolution_not_json": 2, "judge_wrong_type": 2}
    assert gen.judge["scores"] == {"2": 2, "5": 2}
    assert gen.dropped.examples["judge"][0]["score"] == 2

    facts = {"endpoint": {"model": "provider-model"}, "requests": {"sent": client.sent, "cached": 0, "budget": 1000},
             "filters": {"novelty_rouge_l_below": 0.7, "min_chars": 2, "max_chars": 8000, "decontaminate_ngram": 13,
                         "evaluation_grams": 0, "pii_redactions": {}, "texts_redacted": 0, "judge_min_score": 4},
             "generators": {"evol_instruct": gen.facts()}, "outputs": {"evol_instruct": "x.jsonl"}}
    sheet = datasheet.render(facts)
    assert "eliminated: copies_prompt 2, no_gain 2, refusal 2" in sheet
    assert "judge grades (kept at 4 or above): 2: 2, 5: 2" in sheet and "grade at least 4 of 5" in sheet

    # a re-run asks nothing again: every evolution, answer and grade is in the cache
    Provider.prompts = []
    client, filters, again = _evolve(cfg)
    judge(again, client, filters, cfg.synth.filters.judge)
    assert Provider.prompts == [] and client.sent == 0 and again.examples == gen.examples


def test_a_lower_threshold_keeps_what_the_judge_graded_lower(tmp_path, provider):
    # control for the threshold: the same grades, min_score 2, keep the shipping examples too
    cfg = _cfg(tmp_path, provider, min_score=2)
    client, filters, gen = _evolve(cfg)
    judge(gen, client, filters, cfg.synth.filters.judge)
    assert sorted(x["judge_score"] for x in gen.examples) == [2, 2, 5, 5]
    assert gen.dropped.counts == {"judge_unscored": 2}


def test_a_template_value_holding_a_placeholder_is_not_filled_again():
    j = config.JudgeConfig()
    prompt = generators.judge_prompt(j, "Repeat the text '{response}'.", "Done.")[0]["content"]
    assert "Repeat the text '{response}'." in prompt and "Response:\nDone." in prompt
