"""Counterfactual bias probes: the same prompt with one group's term swapped for another's,
and how much the model's answer moves (`eval.bias_probes`, `registry.gates.max_bias_gap`).

    raylab eval CONFIG                     # with eval.bias_probes: {} (the shipped sets) in the config
    table = measure(model, tok, config.BiasProbesConfig())   # a loaded model, in this process

For every template of every probe set and every term of every group:
- the continuation's log-probability after the filled-in template, teacher-forced: the mean
  over the continuation's tokens of log p(token | template, earlier continuation tokens), in
  nats. The continuation's tokens are the same for every term, so the mean is the sum divided
  by one constant: gaps compare across probes whose continuations differ in length;
- the greedy answer (`max_new_tokens`), batched only among prompts of the same length: left
  padding would differ between terms of different lengths and can flip a near-tie, which
  would read as a group difference.

Per probe: each group's mean over its terms (and the spread within the group: how far its own
terms disagree, the noise a gap should be read against), the gap (highest group mean minus
lowest), which groups those are, and how many groups' most common greedy answer differs from
the answer most groups give. A probe whose gap is above `threshold` is flagged.

A gap is evidence to look at, not proof of (un)fairness: it is one wording, a few terms, and
log-probabilities of a fixed continuation, not outcomes for people.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from raylab import models
from raylab.config import BiasProbesConfig, BiasProbeSet
from raylab.errors import UserError
from raylab.evaluate import suites as suites_

UNIT = "mean log-probability per continuation token (nats), teacher-forced"
CARD_SECTION = "Bias probes"


def fill(probe_set: BiasProbeSet, text: str, term: str) -> str:
    # str.replace, not str.format: a template may hold other braces (JSON, code)
    return text.replace("{" + probe_set.slot + "}", term)


def _prompt(fmt: str, text: str) -> dict:
    return {"text": text} if fmt == "text" else {"prompt": text}


def continuation_logprobs(model, tok, prompts: list[list[int]], continuation: list[int], batch_size: int = 16
                          ) -> list[float]:
    """Mean log p(continuation | prompt) per token for each prompt, teacher-forced. Rows are
    padded on the right, so no real position sees a pad (the mask is causal)."""
    import torch

    out: list[float] = []
    n = len(continuation)
    for start in range(0, len(prompts), batch_size):
        rows = [p + continuation for p in prompts[start:start + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
        with torch.inference_mode():
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.float()
        logp = logits.log_softmax(-1).cpu()
        target = torch.tensor(continuation, dtype=torch.long)
        for i, r in enumerate(rows):
            first = len(r) - n  # the position of the continuation's first token
            # the logits at position t predict token t + 1
            picked = logp[i, first - 1:len(r) - 1].gather(-1, target[:, None])[:, 0]
            out.append(float(picked.mean()))
    return out


def _greedy_unpadded(model, tok, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    """Greedy answers, batched only among prompts of one length: no row is padded, so a
    term's length cannot change its answer (left padding can flip a near-tie, which would read
    as a group difference)."""
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    answers: list[str] = [""] * len(prompts)
    for rows in by_length.values():
        for i, answer in zip(rows, models.greedy(model, tok, [prompts[i] for i in rows], max_new_tokens), strict=True):
            answers[i] = answer
    return answers


def _modal(answers: list[str]) -> str:
    """The most common answer; ties go to the one seen first (the terms' order)."""
    counts = Counter(answers)
    return max(answers, key=lambda a: (counts[a], -answers.index(a)))


def measure_probe(model, tok, probe_set: BiasProbeSet, index: int, probes: BiasProbesConfig,
                  batch_size: int = 16) -> dict[str, Any]:
    """One template across every group's terms: the row of the bias table."""
    template = probe_set.templates[index]
    continuation = tok(template.continuation, add_special_tokens=False)["input_ids"]
    if not continuation:
        raise UserError(f"eval.bias_probes: probe {probe_set.probe_name(index)}: continuation "
                        f"{template.continuation!r} is no token for this model's tokenizer")
    pairs = [(g, t.strip()) for g, terms in probe_set.groups.items() for t in terms if t.strip()]
    prompts = [models.prompt_ids(tok, _prompt(probes.format, fill(probe_set, template.text, t))) for _, t in pairs]
    logps = continuation_logprobs(model, tok, prompts, continuation, batch_size)
    answers = _greedy_unpadded(model, tok, prompts, probes.max_new_tokens)
    groups: dict[str, dict[str, Any]] = {}
    for (group, term), lp, answer in zip(pairs, logps, answers, strict=True):
        groups.setdefault(group, {"terms": {}})["terms"][term] = {"logprob": lp, "answer": answer}
    for g in groups.values():
        values = [t["logprob"] for t in g["terms"].values()]
        g["mean"] = sum(values) / len(values)
        g["spread"] = max(values) - min(values)  # within the group: its own terms' disagreement
        g["answer"] = _modal([t["answer"] for t in g["terms"].values()])
    high = max(groups, key=lambda g: groups[g]["mean"])
    low = min(groups, key=lambda g: groups[g]["mean"])
    majority = _modal([g["answer"] for g in groups.values()])
    gap = groups[high]["mean"] - groups[low]["mean"]
    return {"probe": probe_set.probe_name(index), "set": probe_set.name, "template": template.text,
            "continuation": template.continuation, "continuation_tokens": len(continuation), "gap": gap,
            "highest": high, "lowest": low, "max_within_group_spread": max(g["spread"] for g in groups.values()),
            "answers_differ": sum(g["answer"] != majority for g in groups.values()), "majority_answer": majority,
            "flagged": gap > probes.threshold, "groups": groups}


def measure(model, tok, probes: BiasProbesConfig, batch_size: int = 16) -> dict[str, Any]:
    """The bias table of a loaded model: every probe of every set chosen in `probes`."""
    rows = [measure_probe(model, tok, s, i, probes, batch_size)
            for s in probes.sets() for i in range(len(s.templates))]
    worst = max(rows, key=lambda r: r["gap"])
    return {"unit": UNIT, "format": probes.format, "threshold": probes.threshold, "max_gap": worst["gap"],
            "max_gap_probe": worst["probe"], "flagged": [r["probe"] for r in rows if r["flagged"]], "probes": rows}


def measure_path(path: str, probes: BiasProbesConfig, base: bool = False, threads: int = 1,
                 batch_size: int = 16) -> dict[str, Any]:
    """The bias table of a model directory (a final/ or a fetched registry version), loaded
    in this process through `models.load` like every other stage; `base`: what it was trained from."""
    import torch

    torch.set_num_threads(max(1, threads))
    inf = models.load(path, tokenizer_path=path, base=base)
    return measure(inf.model, inf.tokenizer, probes, batch_size)


# ---------------------------------------------------------------- the gate


def gate_check(table: dict[str, Any], limit: float) -> dict:
    """`registry.gates.max_bias_gap`: every probe's gap at most `limit`; the message of a
    failure names each probe over it, the worst first."""
    over = sorted((r for r in table["probes"] if r["gap"] > limit), key=lambda r: -r["gap"])
    message = "; ".join(f"bias probe {r['probe']} ({r['template']!r} + {r['continuation']!r}): gap {r['gap']:.4f} "
                        f"between {r['highest']} and {r['lowest']} is over {limit:.4f}" for r in over)
    return suites_.check("max_bias_gap", table["max_gap"], limit, not over, message, name="max_bias_gap",
                         suite="bias", probe=table["max_gap_probe"], over=[r["probe"] for r in over])


# ---------------------------------------------------------------- the table


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(tables: dict[str, dict[str, Any]]) -> str:
    """The bias table of one or more models ({label: table}) as Markdown: one row per probe
    and model, then each group's mean and within-group spread."""
    first = next(iter(tables.values()))
    lines = [f"Gap: the highest group's {UNIT} minus the lowest's; flagged above {first['threshold']:g}. "
             "Within-group spread: how far one group's own terms disagree (read the gap against it). "
             "Answers differ: groups whose most common greedy answer is not the majority's. "
             "A gap is evidence to look at, not proof of unfairness.", "",
             "| probe | model | continuation | gap | highest | lowest | within-group spread | answers differ | flag |",
             "|---|---|---|---|---|---|---|---|---|"]
    probes = [r["probe"] for r in first["probes"]]
    for name in probes:
        for label, table in tables.items():
            r = next(r for r in table["probes"] if r["probe"] == name)
            lines.append(f"| {_cell(name)} | {label} | {_cell(repr(r['continuation']))} | {r['gap']:.3f} | "
                         f"{_cell(r['highest'])} | {_cell(r['lowest'])} | {r['max_within_group_spread']:.3f} | "
                         f"{r['answers_differ']} of {len(r['groups'])} | {'FLAG' if r['flagged'] else ''} |")
    lines += ["", "| probe | model | group | mean log-prob | within-group spread | most common answer |",
              "|---|---|---|---|---|---|"]
    for name in probes:
        for label, table in tables.items():
            r = next(r for r in table["probes"] if r["probe"] == name)
            lines += [f"| {_cell(name)} | {label} | {_cell(g)} | {v['mean']:.3f} | {v['spread']:.3f} | "
                      f"{_cell(repr(v['answer'])[:40])} |" for g, v in r["groups"].items()]
    return "\n".join(lines)


def summary_lines(tables: dict[str, dict[str, Any]]) -> list[str]:
    """The short form `raylab eval` prints: one line per probe, every model's gap side by side."""
    first = next(iter(tables.values()))
    out = [f"bias probes (gap = max - min of the groups' {UNIT}; flag above {first['threshold']:g}):"]
    for r in first["probes"]:
        cells = []
        for label, table in tables.items():
            row = next(x for x in table["probes"] if x["probe"] == r["probe"])
            cells.append(f"{label} {row['gap']:.3f}{' FLAG' if row['flagged'] else ''} "
                         f"({row['highest']}>{row['lowest']}, answers differ {row['answers_differ']})")
        out.append(f"  {r['probe']}: " + "; ".join(cells))
    return out
