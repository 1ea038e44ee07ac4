"""Lineage and erasure of records (`raylab lineage`, `raylab erase`).

    raylab lineage faq.csv:12                    # data runs, model versions, deployments holding it
    raylab lineage --source faq                  # every data run that read source `faq`, and so on
    raylab lineage --erased                      # the suppression list
    raylab erase faq.csv:12 --source faq --reason "GDPR art. 17, request 4411"

    from raylab.lineage import run_lineage, run_erase
    report = run_lineage(record_id="faq.csv:12")             # {data_runs, versions, deployments, erased}
    result = run_erase("faq.csv:12", reason="request 4411")  # {entry, data_runs, versions, new}

Erasure stops future use: every later data run drops the record (counted as `erased` in its
manifest), and each registered version trained on it is tagged `erasure_pending`, which
`raylab models promote` refuses without --force --reason. A version already trained still
holds the record in its weights: `erasure_pending` means retrain it (docs/governance.md).

The records live in the control-plane database (raylab/core/lineage.py: the record index the
data stage writes, the suppression list); versions and aliases in the registry.
"""

from __future__ import annotations

from raylab.lineage.erase import format_result as format_erase
from raylab.lineage.erase import run_erase
from raylab.lineage.trace import format_erased, run_lineage
from raylab.lineage.trace import format_report as format_lineage

__all__ = ["format_erase", "format_erased", "format_lineage", "run_erase", "run_lineage"]
