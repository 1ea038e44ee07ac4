"""Baseline (c) of bench_serve.py: a plain single-process transformers HTTP server, as a team
would write first: one model, `model.generate` per request, one request at a time.

    python benchmarks/hf_server.py MODEL_DIR --port 8300 --threads 2

`POST /v1/completions` takes OpenAI's prompt / max_tokens / temperature (greedy only),
vLLM's ignore_eos and `stream` (server-sent events, one per generated token, then `data: [DONE]`); `GET /healthz` answers once the model is
loaded.
"""

from __future__ import annotations

import argparse
import json
import queue
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer


class TokenStreamer(BaseStreamer):
    """Each generated token's text as soon as it exists. transformers' TextIteratorStreamer
    holds text back to word boundaries, which would delay this server's first token and
    merge its inter-token gaps; raylab and vLLM send a token per event."""

    def __init__(self, tok):
        self.tok, self.queue, self.prompt_seen = tok, queue.Queue(), False

    def put(self, value):
        if not self.prompt_seen:  # generate() first passes the prompt
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.queue.put(self.tok.decode([token], skip_special_tokens=True))

    def end(self):
        self.queue.put(None)

    def __iter__(self):
        while (piece := self.queue.get()) is not None:
            yield piece


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--port", type=int, default=8300)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_):
            pass

        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._send(200 if self.path == "/healthz" else 404, {"status": "ok"})

        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            ids = torch.tensor([tok(req["prompt"])["input_ids"]])
            n = int(req.get("max_tokens", 16))
            kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                          min_new_tokens=n if req.get("ignore_eos") else 0, do_sample=False,
                          pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None)
            if req.get("stream"):
                self._stream(req, kwargs)
                return
            with lock, torch.inference_mode():
                out = model.generate(**kwargs)
            new = out[0, ids.shape[1]:]
            self._send(200, {"id": "cmpl-hf", "object": "text_completion", "created": int(time.time()),
                             "model": req.get("model"), "choices": [{"index": 0, "text": tok.decode(new, skip_special_tokens=True),
                                                                     "finish_reason": "length", "logprobs": None}],
                             "usage": {"prompt_tokens": ids.shape[1], "completion_tokens": len(new),
                                       "total_tokens": ids.shape[1] + len(new)}})

        def _stream(self, req: dict, kwargs: dict) -> None:
            """generate() in a thread feeding a TokenStreamer, each token an event."""
            with lock:
                streamer = TokenStreamer(tok)

                def run():
                    with torch.inference_mode():
                        model.generate(**kwargs, streamer=streamer)

                worker = threading.Thread(target=run)
                worker.start()
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                for piece in streamer:
                    if piece:
                        event = {"id": "cmpl-hf", "object": "text_completion", "model": req.get("model"),
                                 "choices": [{"index": 0, "text": piece, "finish_reason": None}]}
                        self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                        self.wfile.flush()
                worker.join()
                self.wfile.write(b"data: [DONE]\n\n")

    ThreadingHTTPServer.request_queue_size = 128  # the default backlog of 5 resets a 16-client load
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
