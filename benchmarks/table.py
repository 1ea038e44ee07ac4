"""The table of benchmark figures in benchmarks/README.md, from results/*.json.

    python benchmarks/table.py            # print it
    python benchmarks/table.py --write    # replace the table in benchmarks/README.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
START, END = "<!-- table:start -->", "<!-- table:end -->"


def fmt(x: float | None) -> str:
    """A number in 3 significant digits; None (JSON null) is a value never reached."""
    if x is None:
        return "never"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def rows() -> tuple[list[str], list[str]]:
    current, old = [], []
    for path in sorted((HERE / "results").glob("*.json")):
        records = json.loads(path.read_text())
        for r in records if isinstance(records, list) else [records]:
            if r.get("protocol") == 1 and "a" in r:
                a, b = r["a"], r["b"]
                met = {True: "met", False: "**missed**", None: "-"}[r.get("met")]
                current.append(
                    f"| `{path.name}` {r['name']} | {a['name']}: {fmt(a['median'])} vs {b['name']}: {fmt(b['median'])} "
                    f"{r['unit']}{'; ' + r['summary'] if r.get('summary') else ''} | **{fmt(r['ratio'])}** ({fmt(r['ratio_q1'])}-{fmt(r['ratio_q3'])}"
                    f"{', ' + r['interval'] if r.get('interval') else ''}) | "
                    f"{r.get('goal') or '-'} | {met} | {r['repeats']} | {r['commit']} | {r['date'][:10]} |")
            elif r.get("protocol") == 1 and "warm" in r:  # a reported value without a baseline
                w = r["warm"]
                current.append(f"| `{path.name}` {r['name']} | warm {fmt(w['median'])} ({fmt(w['q1'])}-{fmt(w['q3'])}), "
                               f"cold {fmt(r['cold'])} {r['unit']} | - | - | - | {w['n']} warm | {r['commit']} | {r['date'][:10]} |")
            elif r.get("protocol") == 1 and "profile" in r:
                prof = r["profile"]
                current.append(f"| `{path.name}` {r['name']} | near-dedup share of samples {prof['near_dedup_share']:.1%} "
                               f"| - | - | - | 1 run | {r['commit']} | {r['date'][:10]} |")
            elif r.get("protocol") == 1 and "vllm_version" in r:
                current.append(f"| `{path.name}` {r['name']} | vLLM {r['vllm_version']} (figures in the JSON) | - | - | - | "
                               f"{len(r['summary'])} | {r['commit']} | - |")
            elif "goals" in r:  # a soak run: goals on counts, not a ratio (benchmarks/soak_serve.py)
                met = ", ".join(f"{k} {'met' if ok else '**missed**'}" for k, ok in r["met"].items())
                goals = ", ".join(f"{k} {g}" for k, g in r["goals"].items())
                current.append(f"| `{path.name}` {r['name']} | {r['requests']:,} requests, {r['errors']} errors, RSS growth "
                               f"max {max(r['rss_growth'].values()):.1%} | - | {goals} | {met} | 1 run | "
                               f"{r['commit']} | {r['date'][:10]} |")
            elif "name" in r:
                old.append(f"| `{path.name}` {r['name']} | {fmt(r.get('ratio'))} | {r.get('commit', '?')} |")
    return current, old


def table() -> str:
    current, old = rows()
    lines = ["| point | A vs B (medians) | ratio A/B: median of pairs (IQR unless said) | goal | | pairs | commit | date |",
             "|---|---|---|---|---|---|---|---|", *current]
    if old:
        lines += ["", "Before protocol 1 (one sample per side, not alternated; superseded when re-run):", "",
                  "| point | ratio | commit |", "|---|---|---|", *old]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    text = table()
    if not args.write:
        print(text)
        return
    readme = HERE / "README.md"
    doc = readme.read_text()
    head, rest = doc.split(START)
    _, tail = rest.split(END)
    readme.write_text(f"{head}{START}\n{text}\n{END}{tail}")


if __name__ == "__main__":
    main()
