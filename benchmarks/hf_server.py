"""Baseline (c) of bench_serve.py: a plain single-process transformers HTTP server, as a team
would write first: one model, `model.generate` per request, one request at a time.

    python benchmarks/hf_server.py MODEL_DIR --port 8300 --threads 2

`POST /v1/completions` takes OpenAI's prompt / max_tokens / temperature (greedy only) and
vLLM's ignore_eos; `GET /healthz` answers once the model is loaded.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


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
            with lock, torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                     min_new_tokens=n if req.get("ignore_eos") else 0, do_sample=False,
                                     pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None)
            new = out[0, ids.shape[1]:]
            self._send(200, {"id": "cmpl-hf", "object": "text_completion", "created": int(time.time()),
                             "model": req.get("model"), "choices": [{"index": 0, "text": tok.decode(new, skip_special_tokens=True),
                                                                     "finish_reason": "length", "logprobs": None}],
                             "usage": {"prompt_tokens": ids.shape[1], "completion_tokens": len(new),
                                       "total_tokens": ids.shape[1] + len(new)}})

    ThreadingHTTPServer.request_queue_size = 128  # the default backlog of 5 resets a 16-client load
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
