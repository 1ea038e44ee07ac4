"""`raylab explain CONFIG --model REF --prompt TEXT`: token attributions of a version's answer.

    raylab explain configs/quickstart.yaml --model acme-assistant/3 --prompt "How do I reset my VPN token?"
    raylab explain configs/quickstart.yaml --model acme-assistant/3 --messages '[{"role": "user", "content": "Hi"}]' \
        --target "Hello." --method shapley_sampling --samples 50 --json
    raylab explain configs/quickstart.yaml --model acme-assistant/3 --prompt "..." --html why.html
    raylab explain configs/quickstart.yaml --model acme-assistant/3 --prompt "Reset it in the portal. Then log in." \
        --method feature_ablation --granularity sentence       # or --spans '[[0, 23], [24, 36]]'
    raylab explain configs/quickstart.yaml --model acme-assistant/3 --prompt "..." --method shap --evals 300
    raylab explain configs/quickstart.yaml --model acme-assistant/3 --prompt "..." --influence --top 5
"""

from __future__ import annotations

import argparse

from raylab.cli.common import split


def add_parsers(sub) -> dict:
    """Add `raylab explain`; return {verb: command}."""
    help_ = "attribute each token of a version's answer to the prompt's tokens (captum)"
    e = sub.add_parser("explain", help=help_, description=help_)
    e.add_argument("args", nargs="*", metavar="CONFIG [key=value ...]", help="config file (required) then overrides")
    e.add_argument("--config", "-c", help="the config file (instead of the positional CONFIG)")
    e.add_argument("--model", required=True, metavar="REF", help="NAME/VERSION, NAME@ALIAS, a final/ directory or hub id")
    e.add_argument("--prompt", metavar="TEXT", help="a user message (rendered with the chat template)")
    e.add_argument("--messages", metavar="JSON", help="chat messages as a JSON list of {role, content}")
    e.add_argument("--completion", action="store_true", help="--prompt is plain text to continue (no chat template)")
    e.add_argument("--target", metavar="TEXT", help="the answer to explain (default: the model's greedy answer)")
    e.add_argument("--method", help="integrated_gradients | feature_ablation | shapley_sampling | shap "
                   "(default: explain.method)")
    e.add_argument("--n-steps", type=int, help="integrated gradients' steps (default: explain.n_steps)")
    e.add_argument("--samples", type=int, help="shapley_sampling's permutations (default: explain.samples)")
    e.add_argument("--evals", type=int, help="shap's model evaluations (default: explain.evals)")
    e.add_argument("--spans", metavar="JSON", help="feature_ablation, shapley_sampling: attribute to these spans, "
                   "a JSON list of [start, end] character offsets into --prompt (or the last message)")
    e.add_argument("--granularity", choices=("token", "sentence"), default="token",
                   help="feature_ablation, shapley_sampling: attribute to each token (default) or each sentence")
    e.add_argument("--top", type=int, metavar="K", help="input tokens listed per output token (default 3); with "
                   "--influence, training records listed (default: explain.influence.top_k)")
    e.add_argument("--html", metavar="OUT.html", help="also write the tokens coloured by attribution to this file")
    e.add_argument("--json", action="store_true", help="print the whole result as JSON")
    e.add_argument("--influence", action="store_true", help="instead of token attributions: the training records "
                   "whose loss gradients align most with the answer's (TracIn-style, an approximation)")
    e.add_argument("--checkpoints", metavar="all|final|NAMES", help="with --influence: the saved checkpoints summed "
                   "over (default: explain.influence.checkpoints)")
    e.add_argument("--address", help="with --influence: the Ray cluster (default: RAY_ADDRESS, ray.address, else local)")
    return {"explain": cmd_explain}


def cmd_explain(args: argparse.Namespace) -> int:
    import json

    from raylab import config
    from raylab.errors import UserError
    from raylab.explain import influence_summary, run_explain, run_influence, summary

    path, overrides = split(args, required=True)
    messages = _json_flag("--messages", args.messages)
    spans = _json_flag("--spans", args.spans, "; give [[start, end], ...]")
    if spans is not None and not isinstance(spans, list):
        raise UserError("--spans: give a JSON list of [start, end] pairs")
    cfg = config.load(path, overrides)
    if args.influence:
        for flag, value in (("--method", args.method), ("--n-steps", args.n_steps), ("--samples", args.samples),
                            ("--evals", args.evals), ("--spans", args.spans), ("--html", args.html)):
            if value is not None:
                raise UserError(f"{flag}: token attributions only; --influence ranks training records")
        if args.granularity != "token":
            raise UserError("--granularity: token attributions only; --influence ranks training records")
        result = run_influence(cfg, args.model, args.prompt, args.target, messages=messages, completion=args.completion,
                               top_k=args.top, checkpoints=args.checkpoints, address=args.address)
        print(json.dumps(result, indent=2) if args.json else influence_summary(result))
        return 0
    if args.checkpoints is not None:
        raise UserError("--checkpoints: goes with --influence")
    result = run_explain(cfg, args.model, args.prompt, args.target, args.method,
                         messages=messages, completion=args.completion, n_steps=args.n_steps, samples=args.samples,
                         evals=args.evals, spans=spans, granularity=args.granularity, html=args.html)
    print(json.dumps(result, indent=2) if args.json else summary(result, k=args.top or 3))
    return 0


def _json_flag(flag: str, text: str | None, hint: str = ""):
    """A flag's JSON value (None when not given), or exit 2 naming the flag."""
    import json

    from raylab.errors import UserError

    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{flag}: not JSON ({e.msg} at character {e.pos}){hint}") from None
