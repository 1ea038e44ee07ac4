"""`raylab lineage`: from a record id (or a source) to the data runs that accepted it, the
model versions trained on those runs, and where those versions are deployed.

    raylab lineage faq.csv:12 [--source faq] [--json]
    raylab lineage --source faq
    raylab lineage --erased                      # the suppression list

Data runs come from the control-plane database's record index (written by the data stage);
versions from the registry, by the `data_manifest_hash` each version records; deployments are
the versions' aliases (production, previous, ...) and the endpoint `raylab serve` started
here ($RAYLAB_HOME/serve/endpoint.json), when it serves one of them from the same registry.
A registry or endpoint elsewhere (another MLflow server, a KubeRay cluster) is not seen: ask
it with `--tracking-uri`, or look at that cluster's aliases.
"""

from __future__ import annotations

import json
from dataclasses import asdict

from raylab import registry
from raylab.core import controldb, lineage, runs, storage
from raylab.errors import UserError


def run_lineage(record_id: str | None = None, source: str | None = None, database: str | None = None,
                tracking_uri: str | None = None, store=None) -> dict:
    """The lineage report of a record id (in `source`, if given) or of a whole source:
    {query, data_runs, versions, deployments, erased}. Exit 2 (UserError) when nothing indexed
    matches or there is no control-plane database."""
    found = data_runs_of(record_id, source, database)
    store = store or registry.open_store(tracking_uri=tracking_uri)
    versions = registry.trained_on(store, [d.manifest_hash for d in found])
    return {"query": {"record_id": record_id, "source": source},
            "data_runs": [asdict(d) for d in found],
            "versions": [_version_row(store, mv) for mv in versions],
            "deployments": deployments(store, versions),
            "erased": [e for e in lineage.erased(database) if _names(e, record_id, source)]}


def _names(entry: dict, record_id: str | None, source: str | None) -> bool:
    """Whether a suppression entry is about the record (or the source) asked about."""
    if record_id is None:
        return entry["source"] == source
    return entry["record_id"] == record_id and (source is None or entry["source"] in (source, lineage.ANY_SOURCE))


def data_runs_of(record_id: str | None, source: str | None, database: str | None) -> list[lineage.DataRun]:
    """The indexed data runs holding the record (or source); exit 2 naming what to fix when
    there are none."""
    if record_id is None and source is None:
        raise UserError("lineage: give a RECORD_ID (as the data stage writes it: file:line, sql:KEY, page1#3), "
                        "--source NAME, or --erased")
    found = lineage.runs_with(record_id=record_id, source=source, database=database)
    if found:
        return found
    where = controldb.describe(controldb.url(database))
    if record_id is not None and source is not None and (elsewhere := lineage.sources_of(record_id, database)):
        raise UserError(f"record {record_id!r} is not indexed in source {source!r}; it is in "
                        f"{', '.join(elsewhere)} (fix --source)")
    what = f"record {record_id!r}" if record_id is not None else f"source {source!r}"
    raise UserError(f"{what} is in no data run indexed in {where}: check the id (record ids are relative to "
                    "the source's path: faq.csv:12, not /data/faq.csv:12; see data/records/*.parquet), or the "
                    "database (--database, governance.database or RAYLAB_DATABASE_URL); a data run made before "
                    "lineage existed is indexed when its data stage runs again (a cache hit does it)")


def _version_row(store, mv) -> dict:
    aliases = sorted(a for a, v in registry.registered_model(store, mv.name).aliases.items() if int(v) == int(mv.version))
    return {"name": mv.name, "version": int(mv.version), "aliases": aliases, "run": mv.tags.get("raylab.output_dir"),
            "data_manifest_hash": mv.tags.get("data_manifest_hash"),
            "erasure_pending": registry.erasures_pending(mv), "gates": mv.tags.get("raylab.gates.status", "pending")}


def deployments(store, versions: list) -> list[dict]:
    """Where these versions are in use: each alias that points at one, and the endpoint
    `raylab serve` runs here when it serves one of them from this registry."""
    held = {(mv.name, int(mv.version)) for mv in versions}
    out = []
    for name in sorted({n for n, _ in held}):
        for alias, v in sorted(registry.registered_model(store, name).aliases.items()):
            if (name, int(v)) in held:
                out.append({"kind": "alias", "model": f"{name}/{v}", "alias": alias, "ref": f"{name}@{alias}"})
    endpoint = runs.home().endpoint
    if endpoint.exists():
        try:
            info = json.loads(storage.read_text(str(endpoint)))
        except (OSError, ValueError):
            info = {}
        name, _, version = str(info.get("model") or "").rpartition("/")
        if version.isdigit() and (name, int(version)) in held and info.get("tracking_uri") == store.uri:
            out.append({"kind": "endpoint", "model": info["model"], "url": info.get("url"), "ref": info.get("ref")})
    return out


def format_report(report: dict) -> str:
    """The report as `raylab lineage` prints it."""
    q = report["query"]
    what = f"record {q['record_id']}" + (f" in source {q['source']}" if q["source"] else "") if q["record_id"] \
        else f"source {q['source']}"
    lines = [f"{what}:", f"  data runs ({len(report['data_runs'])}):"]
    for d in report["data_runs"]:
        shown = ", ".join(f"{s}:{r}" if q["record_id"] is None else s for s, r in d["records"])
        more = f" (+{d['matched'] - len(d['records'])} more)" if d["matched"] > len(d["records"]) else ""
        lines.append(f"    {d['run']}  data {d['manifest_hash']}  {d['created']}  [{shown}{more}]")
    lines.append(f"  model versions ({len(report['versions'])}):")
    for v in report["versions"]:
        flag = f"  ERASURE PENDING ({','.join(v['erasure_pending'])})" if v["erasure_pending"] else ""
        lines.append(f"    {v['name']}/{v['version']}  aliases: {','.join(v['aliases']) or '-'}  "
                     f"gates: {v['gates']}{flag}")
    lines.append(f"  deployments ({len(report['deployments'])}):")
    for d in report["deployments"]:
        lines.append(f"    {d['ref']} -> {d['model']}" + (f" served at {d['url']}" if d["kind"] == "endpoint" else ""))
    for e in report["erased"]:
        lines.append(f"  erased: entry {e['id']} {e['time']} by {e['actor']} (source {e['source'] or 'any'}): {e['reason']}")
    return "\n".join(lines)


def format_erased(entries: list[dict]) -> str:
    if not entries:
        return "the suppression list is empty"
    return "\n".join(f"{e['id']:>5} {e['time']} {e['actor']:<20} {e['source'] or '(any source)':<16} {e['record_id']}  "
                     f"{e['reason']}  versions: {', '.join(e['versions']) or '-'}" for e in entries)
