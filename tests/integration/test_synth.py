"""`raylab synth` on the session Ray against a scripted OpenAI-compatible server on loopback
(a stand-in for an outside provider, not for a model: its answers are fixed per prompt).

One module-scoped sequence: a run stopped by the request budget keeps what it made; a re-run
resumes, sending only requests it has no answer for; a third run sends none (counted at the
server). The kept examples pass the filters on planted inputs (a paraphrase, PII, a refusal,
a copy of the evaluation file, a fenced answer) and the data stage reads the output as a chat
source unchanged."""

from __future__ import annotations

import hashlib
import json
import threading

import pytest
from http_helpers import Handler, serving

from raylab import config, synth

pytestmark = pytest.mark.integration

EVAL = ("Acme customers who return a damaged widget within thirty days of delivery receive a full refund to "
        "their original payment method.")
PLANTED = "jane.doe@example.com"
IN_CHUNK = "bob.smith@acme-corp.com"
# chunk marker -> the pairs the scripted provider answers with
PAIRS = {
    "SHIP": [{"question": "How many business days does Acme take to ship a widget order?", "answer": "Two days."}],
    "PARAPHRASE": [{"question": "How many business days does Acme need to ship a widget order?",
                    "answer": "Two business days."}],
    "CONTACT": [{"question": "Who handles warranty claims?", "answer": f"Write to {PLANTED} for warranty claims."}],
    "REFUSE": [{"question": "What is the discount code?", "answer": "I'm sorry, as an AI I cannot share that."}],
    "EVALCOPY": [{"question": "What is the refund policy?", "answer": EVAL}],
}
TASKS = ["Summarise the Acme returns policy in one sentence.", "List three colours Acme widgets come in.",
         "Write a haiku about a warehouse at night.", "Convert 12 inches to centimetres.",
         "Explain what a purchase order is to a new employee.", "Suggest a name for a blue widget."]


class Provider(Handler):
    prompts: list = []
    lock = threading.Lock()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        with self.lock:
            self.prompts.append(prompt)
        self.send_json(200, {"choices": [{"message": {"role": "assistant", "content": answer(prompt)}}]})


def answer(prompt: str) -> str:
    if prompt.startswith("Come up with a series of tasks"):
        i = int(hashlib.sha256(prompt.encode()).hexdigest(), 16)
        return json.dumps({"instructions": [TASKS[i % len(TASKS)], TASKS[(i // 7) % len(TASKS)]]})
    if prompt.startswith("Task: "):
        return json.dumps({"input": "", "output": "Done: " + prompt.split("\n", 1)[0][6:]})
    if "FENCED" in prompt:  # valid JSON inside a code fence: not the format asked for
        return "```json\n" + json.dumps({"pairs": PAIRS["SHIP"]}) + "\n```"
    marker = next(m for m in PAIRS if m in prompt)
    return json.dumps({"pairs": PAIRS[marker]})


@pytest.fixture(scope="module")
def provider():
    with serving(Provider) as url:
        yield url


def _cfg(tmp_path, url: str, budget: int):
    handbook = tmp_path / "handbook.md"
    handbook.write_text("\n\n".join([
        "SHIP: Acme ships every widget order within two business days from Springfield.",
        "PARAPHRASE: Orders for widgets leave the Springfield warehouse two business days after they are placed.",
        f"CONTACT: Warranty claims go to the service desk; the old address {IN_CHUNK} is no longer read.",
        "REFUSE: Discount codes are printed on the back of every catalogue.",
        "EVALCOPY: Refunds for damaged widgets go back to the card the customer paid with.",
        "FENCED: The Springfield warehouse is open Monday to Friday."]))
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text(json.dumps({"question": "What is the refund policy?", "answer": EVAL}) + "\n")
    return config.load_dict({
        "version": 1, "output_dir": str(tmp_path / "run"),
        "data": {"sources": [{"type": "jsonl", "path": str(eval_file)}]},
        "model": {"name_or_path": "preset:tiny-llama"},
        "synth": {"endpoint": {"base_url": f"{url}/v1", "model": "provider-model"},
                  "grounded_qa": {"files": [str(handbook)], "min_chunk_chars": 10, "pairs_per_chunk": 1},
                  "self_instruct": {"seeds": ["Name a primary colour.", "Add 17 and 25."], "instructions": 3,
                                    "per_prompt": 2},
                  "decontaminate": [str(eval_file)], "max_requests": budget, "concurrency": 2, "batch_size": 3}})


def _examples(facts: dict, generator: str) -> list[dict]:
    with open(facts["outputs"][generator]) as f:
        return [json.loads(line) for line in f]


def test_budget_resume_cache_filters_and_the_data_stage_reads_the_output(tmp_path, provider, _session_ray):
    Provider.prompts = []
    first = synth.run_synth(_cfg(tmp_path, provider, budget=4))  # 4 > batch_size: the actor pool
    assert len(Provider.prompts) == first["requests"]["sent"] == 4
    qa = first["generators"]["grounded_qa"]
    assert qa["failed"]["counts"] == {"budget": 2}   # six chunks, four sent: a clean stop
    assert first["generators"]["self_instruct"]["failed"]["counts"]["budget"] >= 1
    assert qa["kept"] == len(_examples(first, "grounded_qa"))
    sent_first = set(Provider.prompts)

    Provider.prompts = []
    second = synth.run_synth(_cfg(tmp_path, provider, budget=100))
    assert second["requests"]["cached"] == 4 and len(Provider.prompts) == second["requests"]["sent"] > 0
    assert not sent_first & set(Provider.prompts)    # resumed: nothing asked twice
    assert IN_CHUNK not in "".join(Provider.prompts)  # chunks are redacted before they leave

    qa = second["generators"]["grounded_qa"]
    assert qa["rejected"]["counts"] == {"not_json": 1}
    assert qa["dropped"]["counts"] == {"contaminated": 1, "novelty": 1, "refusal": 1}
    kept = _examples(second, "grounded_qa")
    text = json.dumps(kept)
    assert [e["messages"][0]["content"] for e in kept] == [
        "How many business days does Acme take to ship a widget order?", "Who handles warranty claims?"]
    assert PLANTED not in text and "<EMAIL>" in text
    assert all(e["chunk_id"].startswith(str(tmp_path / "handbook.md") + "#") for e in kept)
    si = _examples(second, "self_instruct")
    assert len(si) == second["generators"]["self_instruct"]["kept"] >= 2
    assert all(e["messages"][1]["content"].startswith("Done: ") for e in si)
    sheet = (tmp_path / "run" / "synth" / "datasheet.md").read_text()
    assert "refusal 1" in sheet and PLANTED not in sheet

    Provider.prompts = []
    third = synth.run_synth(_cfg(tmp_path, provider, budget=100))
    assert Provider.prompts == [] and third["requests"]["sent"] == 0
    assert _examples(third, "grounded_qa") == kept

    # the output is an ordinary chat source for the data stage: its JSONL reader and record rules
    from raylab.data.records import check_row
    from raylab.data.sources import source_rules
    from raylab.data.sources.rows import parse_json_record

    cfg = _cfg(tmp_path, provider, budget=100)
    src = config.FileSource(type="jsonl", path=second["outputs"]["grounded_qa"], format="chat")
    lines = (tmp_path / "run" / "synth" / "grounded_qa.jsonl").read_bytes().splitlines()
    rows = [check_row(parse_json_record("synth", f"l{n}", line), source_rules(src, cfg.data), [])
            for n, line in enumerate(lines)]
    assert [r["reason"] for r in rows] == [""] * len(kept)
    assert [json.loads(r["messages"]) for r in rows] == [e["messages"] for e in kept]
