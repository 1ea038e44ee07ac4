"""A canary rollout of a bad candidate under real traffic, watched by a real Prometheus.

    sudo apt-get install -y prometheus          # Debian's package; the script refuses without it
    .venv/bin/python examples/delivery/canary_demo.py            # about 4 minutes on 2 cores
    .venv/bin/python examples/delivery/canary_demo.py --out /tmp/demo --percent 25

On an embedded local Ray (no dashboard needed for the metrics) it builds a tiny Llama, trains
a LoRA adapter on it with peft (a fixed answer, as tests/integration/test_serve.py does),
registers it as version 1 and serves it with `raylab.serve.deploy.start_serving`. Version 2
is the bad candidate: the same adapter with its adapter_config.json saying rank 8 while its
weights are rank 16 (a broken export; its checksums are consistent, so it registers and
passes the canary's start checks), so every request routed to it fails on the replica with
a 500. Prometheus scrapes Ray's metrics export port (`ray.metrics_export_port`) every 2 s.

Then `--clients` threads send chat requests as `--users` distinct users, `raylab deploy
acme-demo/2 --canary PCT --for 10m` starts the rollout (the CLI, in a subprocess), and the
controller, with `serve.canary`'s defaults, rolls it back. The script writes into `--out`:

- canary_demo.json: decision time (the controller's `started` -> `decided`), requests sent,
  failed requests overall, inside the canary's share (a user in the share, during the rollout)
  and outside it, the controller's metrics and reason, commit, date and machine;
- canary_demo.png: per-version request rate, error share and p99 latency from Prometheus'
  query_range API, with the canary's start and the rollback marked.

Everything it creates (registry, $RAYLAB_HOME, Prometheus' data) lives in a temporary
directory that is removed at the end.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

NAME = "acme-demo"
QUESTIONS = [f"When does my {c} widget ship?" for c in ("red", "blue", "green", "black")]
ANSWER = "It ships today."
SCRAPE_S = 2  # Prometheus' scrape interval; Ray's own report interval is set to match
RATE_WINDOW = "10s"  # rate() over five scrapes: smooth enough, still sharp at the rollback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- the model and its versions

def build_base(path: Path) -> None:
    """A tiny Llama with a byte tokenizer; embeddings scaled up so LoRA can learn confident logits."""
    import torch

    from raylab import models

    tok = models.build_byte_tokenizer()
    tok.chat_template = models.DEFAULT_CHAT_TEMPLATE
    lm = models.build_tiny_model("tiny-llama", tok, seed=123)
    with torch.no_grad():
        lm.get_input_embeddings().weight.mul_(10)
    tok.save_pretrained(path)
    lm.save_pretrained(path)


def train_adapter(base: Path, out: Path, steps: int = 150) -> float:
    """A LoRA adapter (peft, all linear layers, rank 16) trained to give ANSWER to QUESTIONS."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    rows = []
    for q in QUESTIONS:
        prompt = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True, add_generation_prompt=True,
                                         return_dict=True)["input_ids"]
        rows.append((list(prompt), tok(ANSWER, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]))
    width = max(len(p) + len(t) for p, t in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    labels, mask = torch.full_like(ids, -100), torch.zeros_like(ids)
    for i, (p, t) in enumerate(rows):
        ids[i, :len(p) + len(t)] = torch.tensor(p + t)
        labels[i, len(p):len(p) + len(t)] = torch.tensor(t)
        mask[i, :len(p) + len(t)] = 1
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return loss.item()


def break_adapter(good: Path, bad: Path) -> None:
    """The bad candidate: the good adapter whose config claims rank 8 (its weights are rank
    16), so loading it on a replica fails with a size mismatch, request after request."""
    shutil.copytree(good, bad)
    conf = json.loads((bad / "adapter_config.json").read_text())
    conf.update(r=8, lora_alpha=16)
    (bad / "adapter_config.json").write_text(json.dumps(conf, indent=2))


def demo_config(root: Path, base: Path, port: int, metrics_port: int):
    from raylab import config

    return config.load_dict({
        "version": 1, "output_dir": str(root / "run"), "offline": True,
        "ray": {"metrics_export_port": metrics_port},
        "data": {"sources": [{"type": "jsonl", "path": str(root / "unused.jsonl")}]},
        "model": {"name_or_path": str(base)}, "registry": {"model_name": NAME},
        # one replica each, so the picture shows the canary, not the autoscaler; serve.canary: the defaults
        "serve": {"port": port, "cpus_per_replica": 0.5, "max_batch_size": 4, "batch_wait_timeout_s": 0.05,
                  "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
    })


def register_versions(cfg, base: Path, adapters: list[Path]) -> None:
    from raylab import registry

    store = registry.open_store(cfg)
    exp = registry.experiment_id(store, NAME)
    meta = {"identity": "canary-demo", "base_model": str(base), "method": "lora", "metrics": {}}
    for v, path in enumerate(adapters, 1):
        run = registry.log_run(store, exp, name=f"adapter{v}", key=f"canary-demo-{v}", params={}, history=[],
                               artifacts={}, tags={})
        assert int(registry.register(store, cfg, run, str(path), meta).version) == v
        registry.set_tags(store, NAME, v, {"raylab.gates.status": "passed"})  # the gates are not this demo's subject
    registry.promote(store, NAME, 1)


# ---------------------------------------------------------------- Prometheus

def start_prometheus(root: Path, metrics_port: int) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("prometheus")
    if binary is None:
        sys.exit("prometheus is not installed: `sudo apt-get install -y prometheus` (Debian's package), then run again")
    port = free_port()
    conf = root / "prometheus.yml"
    conf.write_text(json.dumps({  # YAML is a superset of JSON
        "global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"},
        "scrape_configs": [{"job_name": "ray", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}]}))
    proc = subprocess.Popen([binary, f"--config.file={conf}", f"--storage.tsdb.path={root / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                            stdout=subprocess.DEVNULL, stderr=open(root / "prometheus.log", "w"))
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            with urllib.request.urlopen(url + "/-/ready", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    sys.exit(f"prometheus did not become ready; see {root / 'prometheus.log'}")


def prom_get(url: str, path: str, **params) -> dict:
    with urllib.request.urlopen(f"{url}{path}?{urllib.parse.urlencode(params)}", timeout=30) as r:
        body = json.loads(r.read())
    if body.get("status") != "success":
        raise RuntimeError(f"prometheus {path} {params}: {body}")
    return body["data"]


QUERIES = {
    "requests_per_s": f'sum by (version) (rate(ray_raylab_serve_requests_total{{model="{NAME}"}}[{RATE_WINDOW}]))',
    # a version with no error has no errors_total series at all: `or ... * 0` makes its share 0, not absent
    "error_share": (f'(sum by (version) (rate(ray_raylab_serve_errors_total{{model="{NAME}"}}[{RATE_WINDOW}]))'
                    f' or sum by (version) (rate(ray_raylab_serve_requests_total{{model="{NAME}"}}[{RATE_WINDOW}])) * 0)'
                    f' / sum by (version) (rate(ray_raylab_serve_requests_total{{model="{NAME}"}}[{RATE_WINDOW}]))'),
    "p99_latency_s": ('histogram_quantile(0.99, sum by (version, le) '
                      f'(rate(ray_raylab_serve_latency_seconds_bucket{{model="{NAME}"}}[{RATE_WINDOW}])))'),
}


def query_ranges(url: str, start: float, end: float) -> dict:
    """{query name: {version: [(t, value), ...]}} from query_range, NaNs (no traffic) dropped."""
    out = {}
    for name, q in QUERIES.items():
        data = prom_get(url, "/api/v1/query_range", query=q, start=f"{start:.3f}", end=f"{end:.3f}", step=SCRAPE_S)
        out[name] = {s["metric"].get("version", ""): [(float(t), float(v)) for t, v in s["values"] if v != "NaN"]
                     for s in data["result"]}
    return out


# ---------------------------------------------------------------- traffic

class Traffic:
    """`clients` threads asking chat questions of the production model as `users` users in
    turn; every request's outcome is kept (wall-clock times, to compare with the controller's)."""

    def __init__(self, url: str, clients: int, users: int):
        self.url, self.users, self.outcomes = url, users, []
        self.counter, self.stop = itertools.count(), threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(120)

    def _run(self) -> None:
        while not self.stop.is_set():
            n = next(self.counter)
            user = f"user-{n % self.users}"
            body = {"model": NAME, "temperature": 0, "user": user, "max_tokens": 32,
                    "messages": [{"role": "user", "content": QUESTIONS[n % len(QUESTIONS)]}]}
            req = urllib.request.Request(self.url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            started, status, text = time.time(), None, ""
            try:
                with urllib.request.urlopen(req, timeout=120) as r:
                    status, text = r.status, json.loads(r.read())["choices"][0]["message"]["content"]
            except urllib.error.HTTPError as e:
                status, text = e.code, e.read().decode()[:200]
            except OSError as e:  # refused, reset, timed out: a failure like a 500
                text = repr(e)
            self.outcomes.append({"user": user, "started": started, "ended": time.time(), "status": status,
                                  "text": text})


def count_failures(outcomes: list[dict], candidate: str, percent: float, started: float, decided: float) -> dict:
    """Requests and failures overall, inside the canary's share (a user the share sends to
    the candidate, asking while the rollout ran) and outside it (everyone else, any time)."""
    from raylab.serve.canary import canary_share

    def inside(o: dict) -> bool:
        return canary_share(o["user"], percent, candidate) and o["ended"] >= started and o["started"] <= decided

    groups = {"total": outcomes, "inside_share": [o for o in outcomes if inside(o)],
              "outside_share": [o for o in outcomes if not inside(o)]}
    return {k: {"requests": len(g), "failed": sum(o["status"] != 200 for o in g)} for k, g in groups.items()}


# ---------------------------------------------------------------- the picture

def plot(series: dict, t0: float, started: float, decided: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {"1": "version 1 (production)", "2": "version 2 (canary candidate)"}
    colours = {"1": "tab:blue", "2": "tab:red"}
    # the p99 is histogram_quantile's interpolation inside raylab's latency buckets (50, 100, 250 ms, ...)
    panels = [("requests_per_s", "requests / s", 1), ("error_share", "share of requests\nanswered 5xx", 1),
              ("p99_latency_s", "p99 latency (ms,\nfrom the buckets)", 1000)]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 7.5), sharex=True)
    for ax, (key, label, scale) in zip(axes, panels, strict=True):
        for version, points in sorted(series[key].items()):
            if points:
                ax.plot([t - t0 for t, _ in points], [v * scale for _, v in points], marker=".", ms=3,
                        color=colours.get(version), label=names.get(version, f"version {version}"))
        ax.axvline(started - t0, color="tab:orange", ls="--", lw=1.2)
        ax.axvline(decided - t0, color="black", ls=":", lw=1.5)
        ax.set_ylabel(label)
        if key == "error_share":
            ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    axes[0].text(started - t0, axes[0].get_ylim()[1], " canary start", va="top", color="tab:orange", fontsize=9)
    axes[0].text(decided - t0, axes[0].get_ylim()[1] * 0.8, " rollback", va="top", fontsize=9)
    axes[0].legend(loc="lower left", fontsize=8)
    axes[-1].set_xlabel(f"seconds (Prometheus query_range, step {SCRAPE_S} s, rate over {RATE_WINDOW})")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------- the run

def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "system": platform.platform()}


def commit() -> str:
    here = Path(__file__).resolve().parent
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True,
                           text=True).stdout.strip()
    return done.stdout.strip() + ("-dirty" if dirty else "")


def run(args, root: Path) -> dict:
    import ray

    from raylab.serve import deploy, rollout
    from raylab.serve.canary import canary_share

    base, good, bad = root / "base", root / "adapter-good", root / "adapter-bad"
    build_base(base)
    loss = train_adapter(base, good)
    break_adapter(good, bad)
    metrics_port = free_port()
    cfg = demo_config(root, base, free_port(), metrics_port)
    register_versions(cfg, base, [good, bad])
    info = deploy.start_serving(cfg)
    prom, prom_url = start_prometheus(root, metrics_port)
    try:
        candidate = f"{NAME}/2"
        with Traffic(info["url"], args.clients, args.users) as traffic:
            t0 = time.time()
            time.sleep(args.before_s)
            cli = subprocess.run([sys.executable, "-m", "raylab", "deploy", candidate, "--canary", str(args.percent),
                                  "--for", "10m", "--address", info["dashboard"]],
                                 capture_output=True, text=True, timeout=300)
            if cli.returncode != 0:
                raise RuntimeError(f"raylab deploy --canary failed:\n{cli.stderr[-3000:]}")
            while (status := rollout.canary_status())["status"] == rollout.RUNNING:
                if time.time() - t0 > args.before_s + 900:
                    raise RuntimeError(f"no decision after 15 minutes: {status}")
                time.sleep(1)
            time.sleep(args.after_s)
        end = time.time()
        time.sleep(3 * SCRAPE_S)  # Ray's last report and Prometheus' last scrape of it
        targets = prom_get(prom_url, "/api/v1/targets")["activeTargets"]
        series = query_ranges(prom_url, t0, end)
        prom_version = prom_get(prom_url, "/api/v1/status/buildinfo")["version"]
    finally:
        prom.terminate()
        prom.wait(30)
        deploy.stop_serving()
        ray.shutdown()
    started, decided = status["started"], status["decided"]
    counts = count_failures(traffic.outcomes, candidate, args.percent, started, decided)
    answers = sorted({o["text"] for o in traffic.outcomes if o["status"] == 200})
    result = {
        "what": "canary rollout of a bad candidate (every request to it a 500) under steady traffic, rolled back "
                "automatically by the controller with serve.canary's defaults",
        "commit": commit(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
        "adapter_train_loss": round(loss, 4),
        "command": f"raylab deploy {candidate} --canary {args.percent:g} --for 10m",
        "traffic": {"clients": args.clients, "users": args.users, "seconds": round(end - t0, 1),
                    "before_canary_s": args.before_s, "after_decision_s": args.after_s,
                    "users_in_share": sum(canary_share(f"user-{u}", args.percent, candidate)
                                          for u in range(args.users)),
                    "answers_of_200s": answers},
        "decision": {"status": status["status"], "reason": status.get("reason"),
                     "decision_time_s": round(decided - started, 2), "thresholds": status["thresholds"],
                     "metrics": status["metrics"], "controller_starts": status.get("starts")},
        "requests": counts,
        "prometheus": {"version": prom_version, "scrape_interval_s": SCRAPE_S,
                       "target_health": [t["health"] for t in targets], "queries": QUERIES,
                       "points": {k: {v: len(p) for v, p in s.items()} for k, s in series.items()}},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    title = (f"{NAME}: canary of version 2 ({args.percent:g}% of {args.users} users), rolled back after "
             f"{decided - started:.1f} s; {counts['total']['failed']} of {counts['total']['requests']} requests "
             f"failed, {counts['outside_share']['failed']} outside the share")
    plot(series, t0, started, decided, out / "canary_demo.png", title)
    (out / "canary_demo.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.requests:
        Path(args.requests).write_text("".join(json.dumps(o) + "\n" for o in traffic.outcomes))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "docs" / "images"))
    p.add_argument("--clients", type=int, default=4, help="concurrent client threads")
    p.add_argument("--users", type=int, default=200, help="distinct `user` values the clients cycle through")
    p.add_argument("--percent", type=float, default=10, help="the canary's share of production traffic")
    p.add_argument("--before-s", type=float, default=40, help="traffic before the canary starts")
    p.add_argument("--after-s", type=float, default=40, help="traffic after the decision")
    p.add_argument("--requests", help="also write every request's outcome here (JSON lines)")
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="canary-demo-"))
    # raylab's state for this demo only (registry, canary state, audit log), not the user's ~/.raylab
    os.environ["RAYLAB_HOME"] = str(root / "home")
    os.environ["XDG_CONFIG_HOME"] = str(root / "config")  # where the audit log's signing key is created
    # Ray reports metrics to its agent every 10 s by default: every SCRAPE_S, so the
    # picture resolves a rollback that takes seconds (set before the embedded Ray starts)
    os.environ["RAY_metrics_report_interval_ms"] = str(SCRAPE_S * 1000)
    try:
        result = run(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"decision": {k: result["decision"][k] for k in ("status", "reason", "decision_time_s")},
                      "requests": result["requests"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
