"""The model test suite's prompt checks, run by the gates (`raylab models evaluate`, the
pipeline's gates stage): golden prompts (contains, regex, exact, JSON valid under a schema),
the PII-leak probe, refusal probes and the latency budget, and the JUnit report of them all.

    cases = prompt_cases(gates)                         # every prompt to answer, with its budget
    checks = [judge(c, answer) for c, answer in ...]    # one check per prompt
    checks += latency_checks(budget, measure_latency(path, budget))
    storage.write_text("gates.xml", junit(result))

A check is {gate, suite, name, prompt, value, limit, passed, message}: `value` is what was
measured (an answer, redacted when the PII probe found something in it), `message` says why
it failed. The judging is pure (tests give it answers and measured numbers); only
`measure_latency` times anything.
"""

from __future__ import annotations

import json
import math
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from raylab.config import GatesConfig, GoldenPrompt, LatencyBudget, PiiProbe, RefusalProbe
from raylab.core import detectors


@dataclass(frozen=True)
class Case:
    """One prompt to answer greedily, and the spec its answer is judged by."""

    gate: str  # golden | pii_probe | refusal
    spec: GoldenPrompt | PiiProbe | RefusalProbe
    prompt: str  # as reported
    max_new_tokens: int
    item: dict | None = None  # the prompt item answered (models.prompt_ids); default {"prompt": prompt}

    @property
    def asked(self) -> dict:
        return self.item or {"prompt": self.prompt}


def prompt_cases(gates: GatesConfig, training: Callable[[int], list[dict]] | None = None) -> list[Case]:
    """Every prompt of the gates; `training(n)` gives up to n training-data probes (items
    with a `name`), for `pii_probe.from_training_data`."""
    cases = [Case("golden", g, g.prompt, g.max_new_tokens) for g in gates.golden]
    for p in gates.pii_probe:
        cases += [Case("pii_probe", p, prompt, p.max_new_tokens) for prompt in p.prompts]
        if p.from_training_data and training is not None:
            cases += [Case("pii_probe", p, item.pop("name"), p.max_new_tokens, item)
                      for item in training(p.from_training_data)]
    cases += [Case("refusal", r, prompt, r.max_new_tokens) for r in gates.refusal for prompt in r.prompts]
    return cases


def training_probes(records: list[dict], n: int) -> list[dict]:
    """Up to n prompt items from training records (rows of the data stage's records/:
    record_id, format, text, messages, split) in which a value was redacted: a completion
    record's text up to the first placeholder (its last 400 characters), a conversation up to
    the assistant turn that holds one or answers the turn that does. The data stage redacts
    before training, so the fine-tuned model never saw those values; the probe checks it
    produces no such value exactly where training put one (from its base model, or from a
    record a detector missed)."""
    placeholder = re.compile("|".join(re.escape(d.placeholder) for d in detectors.detectors()))
    out = []
    for row in sorted(records, key=lambda r: r["record_id"]):
        if len(out) == n:
            break
        if row.get("split", "train") != "train":
            continue
        if row.get("messages"):
            messages = json.loads(row["messages"])
            at = next((i for i, m in enumerate(messages) if placeholder.search(m["content"])), None)
            if at is None:
                continue
            turn = next((i for i in range(at, len(messages)) if messages[i]["role"] == "assistant"), None)
            if not turn:
                continue
            out.append({"messages": messages[:turn], "name": f"training record {row['record_id']}"})
        elif row.get("text"):
            m = placeholder.search(row["text"])
            if m is None or not row["text"][:m.start()].strip():
                continue
            out.append({"text": row["text"][:m.start()][-400:], "name": f"training record {row['record_id']}"})
    return out


def check(gate: str, value: Any, limit: Any, passed: bool, message: str = "", **extra) -> dict:
    return {"gate": gate, "value": value, "limit": limit, "passed": bool(passed), "message": "" if passed else message,
            **extra}


def judge(case: Case, answer: str) -> dict:
    """The check of one answer."""
    spec, where = case.spec, {"prompt": case.prompt, "suite": case.spec.suite or case.gate}
    if case.gate == "golden":
        why = golden_failures(spec, answer)
        limit = {k: v for k, v in (("contains", spec.contains), ("regex", spec.regex), ("exact", spec.exact),
                                   ("json_schema", spec.json_schema)) if v is not None}
        return check("golden", answer, limit, not why, "; ".join(why), name=spec.name or case.prompt, **where)
    if case.gate == "pii_probe":
        redacted, found = detectors.redact(answer, detectors.detectors())
        # The report shows the answer redacted: a JUnit file is a CI artifact many people read.
        return check("pii_probe", redacted, "no personal data or secrets", not found,
                     f"the answer holds {', '.join(f'{n} {k}' for k, n in sorted(found.items()))}",
                     name=case.prompt, found=found, **where)
    ok = re.search(spec.pattern, answer) is not None
    return check("refusal", answer, {"pattern": spec.pattern}, ok, f"not a refusal (no match for {spec.pattern!r})",
                 name=case.prompt, **where)


def golden_failures(g: GoldenPrompt, answer: str) -> list[str]:
    """What a golden prompt's answer lacks; empty when it passes."""
    why = []
    if g.contains is not None and g.contains not in answer:
        why.append(f"does not contain {g.contains!r}")
    if g.regex is not None and re.search(g.regex, answer) is None:
        why.append(f"does not match {g.regex!r}")
    if g.exact is not None and answer.strip() != g.exact.strip():
        why.append(f"is not exactly {g.exact!r}")
    if g.json_schema is not None:
        import jsonschema

        try:
            doc = json.loads(answer)
        except json.JSONDecodeError as e:
            why.append(f"is not JSON ({e.msg} at position {e.pos})")
        else:
            error = jsonschema.exceptions.best_match(jsonschema.validators.validator_for(g.json_schema)(g.json_schema)
                                                     .iter_errors(doc))
            if error is not None:
                at = "/".join(str(p) for p in error.absolute_path) or "the document"
                why.append(f"is JSON but not valid under json_schema: {at}: {error.message}")
    return why


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: with 5 prompts the p95 is the slowest)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def latency_checks(budget: LatencyBudget, measured: dict) -> list[dict]:
    """The budget against measured numbers: {latencies_s: [...], tokens: N, seconds: S}."""
    suite = budget.suite or "latency"
    checks = []
    if budget.max_p95_latency_s is not None:
        p95 = percentile(measured["latencies_s"], 95)
        checks.append(check("latency", round(p95, 4), budget.max_p95_latency_s, p95 <= budget.max_p95_latency_s,
                            f"p95 latency {p95:.3f}s over the budget of {budget.max_p95_latency_s}s",
                            name="p95 latency (s)", suite=suite, prompts=len(measured["latencies_s"])))
    if budget.min_tokens_per_s is not None:
        rate = measured["tokens"] / measured["seconds"] if measured["seconds"] > 0 else math.inf
        checks.append(check("throughput", round(rate, 2), budget.min_tokens_per_s, rate >= budget.min_tokens_per_s,
                            f"{rate:.1f} tokens/s under the budget of {budget.min_tokens_per_s}",
                            name="tokens per second", suite=suite, tokens=measured["tokens"]))
    return checks


def measure_latency(path: str, budget: LatencyBudget, threads: int = 1) -> dict:
    """Time each prompt's greedy answer on the local engine (this process), after one
    warm-up answer; the tokens counted are the ones generated before the end of turn."""
    import torch

    from raylab import models

    torch.set_num_threads(max(1, threads))
    inf = models.load(path)
    model, tok = inf.model, inf.tokenizer
    models.greedy(model, tok, [models.prompt_ids(tok, {"prompt": budget.prompts[0]})], budget.max_new_tokens)
    latencies, tokens = [], 0
    for prompt in budget.prompts:
        ids = models.prompt_ids(tok, {"prompt": prompt})
        started = time.perf_counter()
        (answer,) = models.greedy_ids(model, tok, [ids], budget.max_new_tokens)
        latencies.append(time.perf_counter() - started)
        tokens += len(answer)
    return {"latencies_s": latencies, "tokens": tokens, "seconds": sum(latencies)}


def describe(c: dict) -> str:
    if c.get("unmeasurable"):  # set, but nothing to measure it on (evaluate/gates.py remote_checks)
        return f"{c['gate']}: {c['message']}"
    if c["gate"] in ("golden", "pii_probe", "refusal"):
        verdict = "ok" if c["passed"] else c["message"]
        return f"{c['gate']} {c['prompt']!r:.60}: answer {c['value']!r:.80} {verdict}"
    if c["gate"] in ("latency", "throughput"):
        return f"{c['name']}: {c['value']} (budget {c['limit']})" + ("" if c["passed"] else f": {c['message']}")
    if c["gate"] in ("min_recall_at_k", "min_mrr"):
        return f"{c['gate']}: {c['message']}" if c["value"] is None or not c["passed"] else \
            f"{c['gate']}: {c['value']:.4f} >= {c['limit']:.4f} (k={c['k']})"
    if c["gate"] in ("max_quality_drop", "min_speedup"):  # a version `raylab optimize` made, against its parent
        op = "<=" if c["gate"] == "max_quality_drop" else ">="
        return f"{c['gate']}: {c['message']}" if not c["passed"] else \
            f"{c['gate']}: {c['value']:.4f} {op} {c['limit']:.4f} (against {c['parent']})"
    if c["gate"] == "max_bias_gap":
        return f"max_bias_gap: {c['message']}" if not c["passed"] else \
            f"max_bias_gap: {c['value']:.4f} <= {c['limit']:.4f} (largest gap: bias probe {c['probe']})"
    extra = f" (production v{c['production_version']}: {c['production_val_loss']:.4f})" if "production_version" in c else ""
    return f"{c['gate']}: {c['value']:.4f} <= {c['limit']:.4f}{extra}"


def junit(result: dict) -> str:
    """The gates' result as JUnit XML: one <testsuite> per suite (a suite file, or the gate's
    kind for checks written in the config), one <testcase> per check, <failure> on failures.
    The element and attribute names are the ones Jenkins, GitLab and GitHub readers take."""
    checks = result["checks"]
    ref = f"{result['name']}/{result['version']}"
    root = ET.Element("testsuites", name=f"raylab gates {ref}", tests=str(len(checks)),
                      failures=str(sum(not c["passed"] for c in checks)), errors="0")
    groups: dict[str, list[dict]] = {}
    for c in checks:
        groups.setdefault(c.get("suite") or c["gate"], []).append(c)
    for suite, members in groups.items():
        ts = ET.SubElement(root, "testsuite", name=suite, tests=str(len(members)),
                           failures=str(sum(not c["passed"] for c in members)), errors="0", skipped="0",
                           timestamp=result.get("evaluated", ""))
        props = ET.SubElement(ts, "properties")
        ET.SubElement(props, "property", name="model", value=ref)
        for c in members:
            case = ET.SubElement(ts, "testcase", classname=f"{result['name']}.{suite}", name=str(c.get("name") or c["gate"]))
            if not c["passed"]:  # before system-out: the order JUnit's schema gives a testcase's children
                failure = ET.SubElement(case, "failure", message=c["message"] or describe(c), type=c["gate"])
                failure.text = describe(c)
            out = ET.SubElement(case, "system-out")
            out.text = json.dumps({k: v for k, v in c.items() if k not in ("passed", "message")}, default=str)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_junit(result: dict, location: str) -> str:
    from raylab.core import storage

    return storage.write_text(location, junit(result))
