"""Synthetic data (issue 30): `raylab synth` against a plain asyncio client doing the same work,
and the novelty filter's time at 10 k and 100 k examples.

    python benchmarks/bench_synth.py            (or: make bench NAME=synth)
    python benchmarks/bench_synth.py --smoke    # small sizes, 2 pairs: checks the script; writes no result

Protocol: benchmarks/README.md (version 1). Written before it was run (item 9):

- **Endpoint.** A scripted OpenAI-compatible server on loopback (this file, `--serve`, its own
  process, `ThreadingHTTPServer` with HTTP/1.1 keep-alive): every request waits a fixed
  service time of 100 ms (a model's generation time, spent off the client's CPU) and answers
  grounded_qa's format, `{"pairs": [...]}`, with two pairs made from the chunk's own words;
  every 10th chunk's second answer is a refusal and every 7th chunk's second question repeats
  its first, so the refusal and novelty filters drop real examples.
  Not a raylab-served tiny model: a tiny model (random, or the quickstart's briefly trained
  one) does not answer in the strict JSON format, so the parser would reject every answer and
  nothing would be "generated-and-filtered"; and its generation time would depend on the two
  cores both clients share. What is measured is the client: how fast requests go out, come
  back, are parsed, filtered and written.
- **Work** (`throughput`). grounded_qa over 600 chunks (deterministic generated documents,
  one paragraph each, 40-70 random words from a 5,000-word vocabulary, seed 0) with
  pairs_per_chunk 2, concurrency 4, the default filters (PII redaction with the data stage's
  detectors, length, refusal, decontamination against a 3-line evaluation file, MinHash +
  ROUGE-L novelty with its candidate recall measured on the default 200-prompt sample).
- **A:** `raylab.synth.run_synth(cfg)` in this process (what `raylab synth CONFIG` runs after
  loading the config): a Ray Data actor pool of `synth.concurrency` = 4 requesters, batches of
  8, each answer written to the cache, then parsing, filters, the JSONL and the datasheet. The
  embedded Ray cluster is started by the untimed warm-up and reused (Ray's start is
  bench_connect's figure); every sample writes to a new output directory, so nothing comes from
  the cache.
- **B:** a plain asyncio client in this process: httpx.AsyncClient, an asyncio.Semaphore(4) (the
  same 4 requests in flight), the same request bodies (messages, model, temperature,
  max_tokens), then the same work after the answers as raylab's driver does: the same chunks
  (generators.read_chunks), redaction, raylab.synth.parse.parse_pairs, the same Filters and
  Novelty classes (with the recall sample), in chunk order, and the kept examples written as
  JSONL. What B does not do: cache each answer to a file, retry (the server never fails), and
  write the datasheet (raylab's extra work, part of what it costs). B runs at this process's
  niceness, not Ray's 15 (item 6): what it stands in for is waiting on the network, which
  niceness does not change on a quiet machine. Both sides must keep the same examples (checked).
- **Metric.** Kept (generated-and-filtered) examples per second, from reading the chunks to the
  written output; 5 pairs, A and B alternating, one untimed warm-up of each.
- **Goal** (issue 30): A / B >= 0.9 (Ray adds little).
- **Novelty** (`novelty`). filters.Novelty (num_perm 128, 32 bands, 5-character shingles,
  threshold 0.7, recall_sample 0: the filter alone, not its recall report) offered 100,000 (A)
  and 10,000 (B) deterministic generated prompts: 8-19 random words from a 5,000-word vocabulary
  (seed 0) and a question mark, every 10th a copy of an earlier prompt with one word replaced
  (a near duplicate the filter should drop). Metric: wall seconds to offer them all, in one
  process, A and B alternating, 5 pairs, one untimed warm-up of each. Goal (issue 30): A / B <=
  15 (sub-quadratic: 10x the examples in at most 15x the time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PORT, SERVICE_S, CONCURRENCY, PAIRS = 8350, 0.1, 4, 2
FULL = {"chunks": 600, "repeats": 5, "novelty": (100_000, 10_000)}
SMOKE = {"chunks": 40, "repeats": 2, "novelty": (5_000, 500)}
MARK = "Here is a passage from a company's documents:\n\n"  # config.GROUNDED_QA_PROMPT's opening


def vocabulary(rng: random.Random, n: int = 5000) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randrange(3, 9))) for _ in range(n)]


def documents(n: int) -> list[str]:
    """n paragraphs "Doc I: ...", 40-70 random words each (seed 0)."""
    rng = random.Random(0)
    vocab = vocabulary(rng)
    return [f"Doc {i}: " + " ".join(rng.choice(vocab) for _ in range(rng.randrange(40, 71))) + "." for i in range(n)]


def prompts_for_novelty(n: int) -> list[str]:
    """n prompts (seed 0); every 10th a copy of an earlier one with one word replaced."""
    rng = random.Random(0)
    vocab = vocabulary(rng)
    out: list[str] = []
    for i in range(n):
        if out and i % 10 == 9:
            words = rng.choice(out).split()
            words[rng.randrange(len(words))] = rng.choice(vocab)
            out.append(" ".join(words))
        else:
            out.append(" ".join(rng.choice(vocab) for _ in range(rng.randrange(8, 20))) + "?")
    return out


# -- the scripted endpoint ----------------------------------------------------------------------


def scripted_answer(prompt: str) -> str:
    """Two pairs from the chunk's words; every 10th chunk's second answer a refusal, every 7th
    chunk's second question its first again (a repeat the novelty filter drops)."""
    chunk = prompt[len(MARK):].split("\n\nWrite ", 1)[0] if prompt.startswith(MARK) else prompt
    head, _, body = chunk.partition(": ")
    i = int(head.split()[-1]) if head.startswith("Doc ") else 0
    words = body.rstrip(".").split()

    def question(k: int, ws: list[str]) -> str:
        return f"What does document {k} say about {' '.join(ws[:6])}?"

    pairs = [{"question": question(i, words), "answer": " ".join(words[6:20]) + "."},
             {"question": f"Which of {' '.join(words[20:28])} comes first?", "answer": " ".join(words[28:36]) + "."}]
    if i % 10 == 9:
        pairs[1]["answer"] = "I'm sorry, as an AI I cannot answer that."
    if i % 7 == 6:
        pairs[1]["question"] = pairs[0]["question"]  # the same question twice: novelty keeps one
    return json.dumps({"pairs": pairs[:PAIRS]})


class Scripted(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: both clients reuse their connections

    def log_message(self, *args):
        pass

    def do_GET(self):  # /healthz
        self._send(200, b"{}")

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        time.sleep(SERVICE_S)  # the model's service time, off the clients' CPU
        content = scripted_answer(body["messages"][-1]["content"])
        self._send(200, json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                                 "finish_reason": "stop"}]}).encode())

    def _send(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def serve(port: int) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", port), Scripted)
    server.daemon_threads = True
    server.serve_forever()


# -- the two clients ----------------------------------------------------------------------------


def synth_config(root: Path, chunks: int, out: Path):
    from raylab import config

    handbook = root / "documents.md"
    if not handbook.exists():
        handbook.write_text("\n\n".join(documents(chunks)) + "\n")
        (root / "eval.jsonl").write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in [
            ("Where is the Springfield warehouse?", "On Evergreen Terrace, next to the plant, open every weekday."),
            ("How long do refunds take?", "Refunds reach the original card within ten business days of the return."),
            ("Who approves travel?", "Your manager approves travel requests in the expenses tool before booking.")]))
    return config.load_dict({
        "version": 1, "offline": True, "output_dir": str(out),
        "data": {"sources": [{"type": "jsonl", "path": str(root / "eval.jsonl")}]},
        "model": {"name_or_path": "preset:tiny-llama"},
        "synth": {"endpoint": {"base_url": f"http://127.0.0.1:{PORT}/v1", "model": "scripted"},
                  "grounded_qa": {"files": [str(handbook)], "pairs_per_chunk": PAIRS},
                  "decontaminate": [str(root / "eval.jsonl")], "max_requests": chunks + 10,
                  "concurrency": CONCURRENCY}})


def raylab_side(root: Path, chunks: int, counter: list[int]) -> tuple[float, list[str]]:
    from raylab import synth

    counter[0] += 1
    cfg = synth_config(root, chunks, root / f"raylab-{counter[0]}")
    started = time.perf_counter()
    facts = synth.run_synth(cfg)
    seconds = time.perf_counter() - started
    with open(facts["outputs"]["grounded_qa"]) as f:
        kept = [json.loads(line)["messages"][0]["content"] for line in f]
    assert facts["requests"]["sent"] == chunks and facts["generators"]["grounded_qa"]["requests"]["ok"] == chunks
    return len(kept) / seconds, kept


async def _ask(client, sem, url: str, body: dict) -> str:
    async with sem:
        resp = await client.post(url, json=body)
        resp.raise_for_status()
        return resp.json()["choices"][0]["message"]["content"]


async def _ask_all(url: str, bodies: list[dict], timeout_s: float) -> list[str]:
    import httpx

    sem = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(timeout=timeout_s, limits=httpx.Limits(max_connections=CONCURRENCY)) as client:
        return await asyncio.gather(*(_ask(client, sem, url, b) for b in bodies))


def baseline_side(root: Path, chunks: int, counter: list[int]) -> tuple[float, list[str]]:
    """The plain client: the same requests with asyncio, then raylab's parser and filters."""
    from raylab.synth import generators, parse
    from raylab.synth.filters import Filters, Novelty

    counter[0] += 1
    cfg = synth_config(root, chunks, root / f"baseline-{counter[0]}")
    s, g, ep = cfg.synth, cfg.synth.grounded_qa, cfg.synth.endpoint
    started = time.perf_counter()
    filters = Filters(s.filters, cfg.data.pii, generators.eval_texts(cfg))
    f = s.filters
    novelty = Novelty(f.novelty, f.num_perm, f.bands, f.ngram, f.recall_sample)
    chunk_rows = generators.read_chunks(g)
    bodies = [{"model": ep.model, "messages": generators.qa_prompt(g, filters.redact(c["text"])),
               "temperature": ep.temperature, "max_tokens": ep.max_tokens} for c in chunk_rows]
    answers = asyncio.run(_ask_all(ep.base_url + "/chat/completions", bodies, ep.timeout_s))
    kept = []
    for chunk, text in zip(chunk_rows, answers, strict=True):
        try:
            pairs = parse.parse_pairs(filters.redact(text), g.pairs_per_chunk)
        except parse.Rejected:
            continue
        for p in pairs:
            if filters.check(p["question"], p["answer"]) is None and novelty.offer(p["question"])[0]:
                kept.append({"messages": [{"role": "user", "content": p["question"]},
                                          {"role": "assistant", "content": p["answer"]}],
                             "generator": "grounded_qa", "chunk_id": chunk["id"]})
    novelty.recall()
    out = root / f"baseline-{counter[0]}.jsonl"
    out.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in kept))
    seconds = time.perf_counter() - started
    return len(kept) / seconds, [e["messages"][0]["content"] for e in kept]


def throughput(root: Path, chunks: int, repeats: int) -> dict:
    counts = {"a": [0], "b": [0]}
    kept: dict[str, list] = {"a": [], "b": []}

    def a() -> float:
        rate, k = raylab_side(root, chunks, counts["a"])
        kept["a"] = k
        return rate

    def b() -> float:
        rate, k = baseline_side(root, chunks, counts["b"])
        kept["b"] = k
        return rate

    got = common.alternate(a, b, repeats, warmup=True)
    assert kept["a"] == kept["b"], "the two clients kept different examples: not the same work"
    assert 0 < len(kept["a"]) < PAIRS * chunks, "the filters dropped nothing, or everything"
    settings = {"chunks": chunks, "pairs_per_chunk": PAIRS, "concurrency": CONCURRENCY, "service_s": SERVICE_S,
                "kept": len(kept["a"])}
    return common.point(
        f"generated-and-filtered examples/s, grounded_qa, {chunks} chunks, concurrency {CONCURRENCY}, "
        f"{int(SERVICE_S * 1000)} ms service time", "examples/s",
        ("raylab synth (Ray Data actor pool)", got["a"]), ("asyncio + httpx client, same filters", got["b"]),
        goal="A / B >= 0.9 (issue 30: Ray adds little)", goal_ratio=0.9, warmup=True, load=got["load"],
        a_settings={**settings, "batch_size": 8, "cache": True}, b_settings={**settings, "cache": False})


def novelty_seconds(prompts: list[str]) -> float:
    from raylab.synth.filters import Novelty

    novelty = Novelty(0.7, 128, 32, 5, 0)
    started = time.perf_counter()
    for p in prompts:
        novelty.offer(p)
    return time.perf_counter() - started


def novelty(sizes: tuple[int, int], repeats: int) -> dict:
    big, small = (prompts_for_novelty(n) for n in sizes)
    got = common.alternate(lambda: novelty_seconds(big), lambda: novelty_seconds(small), repeats, warmup=True)
    return common.point(
        f"novelty filter wall seconds, {sizes[0]:,} vs {sizes[1]:,} prompts", "s",
        (f"{sizes[0]:,} prompts", got["a"]), (f"{sizes[1]:,} prompts", got["b"]),
        goal=f"A / B <= 15 (issue 30: sub-quadratic, {sizes[0] // sizes[1]}x the examples)", goal_ratio=15.0,
        higher_is_better=False, warmup=True, load=got["load"],
        a_settings={"prompts": sizes[0], "near_duplicate_every": 10}, b_settings={"prompts": sizes[1]},
        threads=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="small sizes, 2 pairs; writes no result")
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)  # the scripted endpoint
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    p = SMOKE if args.smoke else FULL
    if not args.smoke:
        common.require_clean_commit()
    root = Path(tempfile.mkdtemp(prefix="bench-synth-"))
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(PORT)], start_new_session=True)
    records = []
    try:
        common.wait_healthy(f"http://127.0.0.1:{PORT}", server, timeout_s=60)
        records.append(novelty(p["novelty"], p["repeats"]))  # before Ray starts: the process alone
        records.append(throughput(root, p["chunks"], p["repeats"]))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
    if args.smoke:
        print(f"smoke: {len(records)} points measured; nothing written", file=sys.stderr)
        return
    common.write_results("synth", records)


if __name__ == "__main__":
    main()
