"""`raylab erase`: stop every future use of a record.

    raylab erase faq.csv:12 --reason "GDPR art. 17, request 4411"            # in every source holding it
    raylab erase faq.csv:12 --source faq --reason "..."                      # in source `faq` only

Three steps, each safe to repeat (running the command again finishes an interrupted one):
the record goes on the suppression list in the control-plane database (every later data run
drops it and counts it as `erased`; no cached data-stage output that may hold it is served);
each registered version trained on a data run that accepted it is tagged `erasure_pending`
(`raylab models promote` then refuses it without --force --reason); one `data.erase` event
records who, why, and what was found in the audit log.

What it cannot do: a version already trained still holds the record in its weights, and a
data run already written still holds it in its shards. `erasure_pending` means: re-run the
data stage and retrain, then promote the new version; delete old run directories yourself.
"""

from __future__ import annotations

from raylab import registry
from raylab.core import events, lineage
from raylab.errors import UserError
from raylab.lineage.trace import data_runs_of


def run_erase(record_id: str, reason: str, source: str | None = None, database: str | None = None,
              tracking_uri: str | None = None, store=None) -> dict:
    """Suppress a record, mark the versions that hold it, audit it; returns {entry, new,
    data_runs, versions, marked}. Exit 2 for an unknown record id (or one not in `source`)."""
    if not reason or not reason.strip():
        raise UserError("erase needs --reason TEXT (the request it answers: the audit log records it)")
    found = data_runs_of(record_id, source, database)  # exit 2 when the id is indexed nowhere
    store = store or registry.open_store(tracking_uri=tracking_uri)
    versions = registry.trained_on(store, [d.manifest_hash for d in found])
    labels = [f"{mv.name}/{mv.version}" for mv in versions]
    entry, new = lineage.suppress(record_id, source, reason.strip(), events.actor(), labels, database)
    # the id as the lineage tables hold it (sealed, rid1:..., when governance.encryption seals them)
    # is what the registry's tag and the audit log name
    recorded = lineage.as_recorded(record_id, database)
    marked = [f"{mv.name}/{mv.version}" for mv in versions
              if registry.mark_erasure_pending(store, mv, [entry["id"]], reason=f"record {recorded} erased")]
    events.emit("data.erase", record_id=recorded, source=source or "(any)", reason=reason.strip(),
                entry=entry["id"], new=new, data_runs=[d.run for d in found], versions=labels, marked=marked)
    return {"entry": entry, "new": new, "data_runs": [d.run for d in found], "versions": labels, "marked": marked}


def format_result(result: dict) -> str:
    e = result["entry"]
    head = (f"erased {e['record_id']} ({'source ' + e['source'] if e['source'] else 'every source'}): "
            f"suppression entry {e['id']}" + ("" if result["new"] else " (already on the list since " + e["time"] + ")"))
    lines = [head, f"  later data runs drop it; it was accepted by {len(result['data_runs'])} data run(s):"]
    lines += [f"    {r}" for r in result["data_runs"]]
    if result["versions"]:
        lines.append(f"  erasure_pending: {', '.join(result['versions'])} -- these versions still hold the record; "
                     "retrain them (re-run the data stage, then train) and promote the new version")
    else:
        lines.append("  no registered version was trained on those data runs")
    return "\n".join(lines)
