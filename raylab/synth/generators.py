"""What the generators read and the prompts they send: document chunks (grounded_qa), seed
tasks and their in-context prompts (self_instruct), and the evaluation texts examples must
not overlap.

    chunks = read_chunks(cfg.synth.grounded_qa)      # [{"id", "text"}] sorted by id
    seeds = read_seeds(cfg.synth.self_instruct)
    messages = instruction_prompt(si, seeds, generated, rng)
    kind, messages = evolution_prompt(ev, instruction, rng)   # evol_instruct: one drawn evolution
    messages = judge_prompt(judge, instruction, response)
"""

from __future__ import annotations

import json
import random
import re

from raylab import config
from raylab.core import runs, storage
from raylab.data import document_text
from raylab.errors import UserError

BREADTH = "breadth"  # the in-breadth evolution's name beside the in-depth methods

_PARAGRAPH = re.compile(r"\n\s*\n")


def _data_records(data_run: str) -> list[dict]:
    location = runs.Run(data_run).split("records")
    try:
        table = storage.read_table(location, columns=["source", "record_id", "text", "messages", "split"])
    except FileNotFoundError:
        raise UserError(f"synth.grounded_qa.data_run: no data-stage records under {location}; run `raylab data` "
                        "for that config first") from None
    return table.to_pylist()


def _source_access(data_run: str) -> dict[str, tuple[str | None, list[str]]]:
    """source name -> (org, acl) as the data run's config.resolved.yaml set them (what
    `raylab index` would give its chunks)."""
    location = runs.Run(data_run).resolved_config
    if not storage.exists(location):
        # fail closed: without it no record's org is known, so none may be read as anyone's
        raise UserError(f"synth.grounded_qa.data_run: {location} is missing, so the orgs of its sources are unknown; "
                        "re-run `raylab data` for that config (it writes the file)")
    raw = config.parse_yaml(storage.read_text(location), location)
    sources = ((raw.get("data") or {}).get("sources")) or []
    return {s.get("name") or f"source{i}": (s.get("org"), list(s.get("acl") or [])) for i, s in enumerate(sources)}


def read_chunks(g) -> list[dict]:
    """The chunks questions are asked about, those `g.org` may read (the serving search's rule,
    raylab.rag.store.access_filter): the data run's train-split records (id: the record's
    source and record_id), the chunks of a `raylab index` index (id: its chunk_id), then each
    paragraph of the plain files (id: FILE#N; a file named in the config has no org)."""
    # raylab.rag imports no store: lancedb is needed only when an index is opened
    from raylab.rag import index_chunks, readable

    chunks = []
    if g.index is not None:
        chunks += [{"id": c["chunk_id"], "text": c["text"]} for c in index_chunks(g.index, g.org)]
    if g.data_run is not None:
        access = _source_access(g.data_run)
        for r in _data_records(g.data_run):
            # a source the resolved config does not name has an unknown org: read as another org's
            org, acl = access.get(r["source"], ("", []))
            if r["split"] == "train" and readable(g.org, org, acl):
                chunks.append({"id": f"{r['source']}/{r['record_id']}", "text": document_text(r["text"], r["messages"])})
    for path in g.files:
        if not storage.exists(path):
            raise UserError(f"synth.grounded_qa.files: {path} does not exist")
        try:
            text = storage.read_text(path)
        except UnicodeDecodeError as e:  # the data stage quarantines such a record; here it is the whole input
            raise UserError(f"synth.grounded_qa.files: {path} is not UTF-8 text (byte {e.start}); convert it "
                            "(iconv -f latin1 -t utf-8) or leave it out") from None
        for n, part in enumerate(_PARAGRAPH.split(text)):
            chunks.append({"id": f"{path}#{n}", "text": part.strip()})
    chunks = sorted((c for c in chunks if len(c["text"]) >= g.min_chunk_chars), key=lambda c: c["id"])
    return chunks[:g.max_chunks] if g.max_chunks else chunks


def qa_prompt(g, chunk: str) -> list[dict]:
    return [{"role": "user", "content": g.prompt.replace("{chunk}", chunk).replace("{n}", str(g.pairs_per_chunk))}]


def _lines_or_json(location: str, key: str) -> list[str]:
    """Per line: a JSON object's `key` (or, without a key, all its string values, nested
    too, joined), or a line that is not JSON as it is."""
    out = []
    for line in storage.read_text(location).splitlines():
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError:
            out.append(line.strip())
            continue
        if key:  # one field of each object (seeds' `instruction`)
            out.append(value.get(key) if isinstance(value, dict) else None)
        else:
            out.append("\n".join(_strings(value)))
    return [x for x in out if isinstance(x, str) and x.strip()]


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        # a chat message's role is a label, not text the example could copy
        return [s for k, v in value.items() if k != "role" for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def read_seeds(si, at: str = "synth.self_instruct") -> list[str]:
    """The inline seeds, then the seed file's, without repeats (`at` names the section in errors)."""
    seeds = list(si.seeds)
    if si.seed_file is not None:
        if not storage.exists(si.seed_file):
            raise UserError(f"{at}.seed_file: {si.seed_file} does not exist")
        seeds += _lines_or_json(si.seed_file, "instruction")
    seeds = list(dict.fromkeys(s.strip() for s in seeds if s.strip()))
    if not seeds:
        raise UserError(f"{at}: no seed instructions (seeds and seed_file are empty; a JSONL seed "
                        "file needs an `instruction` field on each line)")
    return seeds


def instruction_prompt(si, seeds: list[str], generated: list[str], rng: random.Random) -> list[dict]:
    """seed_examples seed tasks and generated_examples generated ones (seeds fill in while
    fewer have been generated), shuffled and numbered, as in the paper's prompt."""
    n_gen = min(si.generated_examples, len(generated))
    n_seed = min(len(seeds), si.seed_examples + si.generated_examples - n_gen)
    examples = rng.sample(seeds, n_seed) + rng.sample(generated, n_gen)
    rng.shuffle(examples)
    listed = "\n".join(f"{i}. {e}" for i, e in enumerate(examples, 1))
    return [{"role": "user",
             "content": si.instruction_prompt.replace("{examples}", listed).replace("{n}", str(si.per_prompt))}]


def output_prompt(si, instruction: str) -> list[dict]:
    return [{"role": "user", "content": si.output_prompt.replace("{instruction}", instruction)}]


def evolution_prompt(ev, instruction: str, rng: random.Random) -> tuple[str, list[dict]]:
    """One evolution drawn uniformly from the in-depth methods (and in-breadth when on), as the
    paper draws one per instruction per round: (its name, the messages)."""
    kinds = sorted(ev.depth_methods) + ([BREADTH] if ev.breadth else [])
    kind = rng.choice(kinds)
    if kind == BREADTH:
        content = fill(ev.breadth_prompt, instruction=instruction)
    else:
        content = fill(ev.depth_prompt, method=ev.depth_methods[kind], instruction=instruction)
    return kind, [{"role": "user", "content": content}]


def evol_answer_prompt(ev, instruction: str) -> list[dict]:
    return [{"role": "user", "content": fill(ev.answer_prompt, instruction=instruction)}]


def judge_prompt(judge, instruction: str, response: str) -> list[dict]:
    return [{"role": "user", "content": fill(judge.prompt, instruction=instruction, response=response)}]


def fill(template: str, **values: str) -> str:
    """{name} -> value in one pass, so a value that itself holds "{response}" stays as it is
    (an instruction quoting a template must not receive the answer); other braces are left."""
    return re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), m.group(0)), template)


def eval_texts(cfg) -> list[str]:
    """What no example may overlap: synth.decontaminate files, and the val split of the data
    run grounded_qa reads (held out from training, so the evaluation set)."""
    texts = []
    for path in cfg.synth.decontaminate:
        if not storage.exists(path):
            raise UserError(f"synth.decontaminate: {path} does not exist")
        texts += _lines_or_json(path, "")
    g = cfg.synth.grounded_qa
    if g is not None and g.data_run is not None:
        texts += [document_text(r["text"], r["messages"]) for r in _data_records(g.data_run) if r["split"] == "val"]
    return texts
