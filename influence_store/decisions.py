"""Review decisions as a file: ``review import decisions.csv`` reads what ``proposals list --csv`` writes.

Columns (a header row; others are ignored): ``id`` or ``key`` (with ``dataset`` when a key is in several),
``decision`` (accept, reject, revert, relabel) or else ``status`` as listed (accepted, rejected, proposed;
accepted with a ``new_label`` is a relabel), ``new_label`` and ``note``. A row that matches the proposal's
current state changes nothing, so an exported list imports back as a no-op. Every row is checked before
any is stored, and all are stored in one transaction through the same verb as ``review``.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

from .curation import apply_decisions
from .errors import InfluenceStoreError

if TYPE_CHECKING:
    from .store import Store

STATUS_AS_DECISION = {"accepted": "accept", "rejected": "reject", "proposed": "revert"}
ACTIONS = ("accept", "reject", "revert", "relabel")


def read_decisions(store: Store, path: str) -> list[tuple[int, str, str | None, str | None]]:
    """(proposal id, action, new label, note) for every row that changes something."""
    file = Path(path)
    if not file.is_file():
        raise InfluenceStoreError(f"decisions file {path!r} does not exist; give a CSV file")
    try:
        with file.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = {(c or "").strip().lower() for c in reader.fieldnames or []}
            if not ({"id", "key"} & columns) or not ({"decision", "status"} & columns):
                raise InfluenceStoreError(f"{path!r} needs a header with id (or key) and decision (or status) "
                                          f"columns; it has: {', '.join(sorted(columns)) or '(none)'}")
            rows = [{(k or "").strip().lower(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    except UnicodeDecodeError:
        raise InfluenceStoreError(f"{path!r} is not UTF-8 text; save it as UTF-8 (a spreadsheet's \"CSV UTF-8\")") \
            from None
    proposals = store.proposals()
    by_id = {p["id"]: p for p in proposals}
    decisions = []
    for line, row in enumerate(rows, start=2):
        where = f"{path}:{line}"
        proposal = _find(row, by_id, proposals, where)
        action = _action(row, where)
        if action is None:
            continue
        new_label, note = row.get("new_label") or None, row.get("note") or None
        if action == "relabel" and new_label is None:
            raise InfluenceStoreError(f"{where}: relabel needs a new_label")
        if action != "relabel":
            new_label = None  # a listed relabel's label column means nothing once the status says otherwise
        if not _unchanged(proposal, action, new_label):
            decisions.append((proposal["id"], action, new_label, note))
    return decisions


def import_decisions(store: Store, path: str, actor: str | None = None) -> dict:
    """Store the decisions of a CSV file; returns how many proposals changed and which."""
    decisions = read_decisions(store, path)
    changed = apply_decisions(store, decisions, actor) if decisions else []
    return {"file": path, "changed": len(changed), "proposal_ids": [p["id"] for p in changed]}


def _find(row: dict, by_id: dict, proposals: list[dict], where: str) -> dict:
    if row.get("id"):
        try:
            found = by_id.get(int(row["id"]))
        except ValueError:
            raise InfluenceStoreError(f"{where}: id {row['id']!r} is not a number") from None
        if found is None:
            raise InfluenceStoreError("{where}: no proposal {pid}; see {proposals_list}", where=where, pid=row["id"],
                                      proposals_list="store.proposals()")
        return found
    key, dataset = row.get("key"), row.get("dataset")
    if not key:
        raise InfluenceStoreError(f"{where}: the row has neither id nor key")
    matches = [p for p in proposals if p["key"] == key and (not dataset or p["dataset"] == dataset)]
    newest: dict[str, dict] = {}
    for p in [p for p in matches if p["status"] != "applied"] or matches:
        newest[p["dataset"]] = p  # an example proposed by several rules: its newest proposal decides
    if not newest:
        raise InfluenceStoreError(f"{where}: no proposal for key {key!r}" + (f" in {dataset!r}" if dataset else ""))
    if len(newest) > 1:
        raise InfluenceStoreError(f"{where}: key {key!r} has proposals in datasets {', '.join(sorted(newest))}; "
                                  f"add a dataset column or use id")
    return next(iter(newest.values()))


def _action(row: dict, where: str) -> str | None:
    text = (row.get("decision") or "").lower()
    if text:
        if text not in ACTIONS:
            raise InfluenceStoreError(f"{where}: decision {text!r} is not one of {', '.join(ACTIONS)}")
        return text
    status = (row.get("status") or "").lower()
    if not status or status == "applied":
        return None  # nothing decided, or exported already: nothing to import
    if status not in STATUS_AS_DECISION:
        raise InfluenceStoreError(f"{where}: status {status!r} is not one of {', '.join(STATUS_AS_DECISION)}")
    return "relabel" if status == "accepted" and row.get("new_label") else STATUS_AS_DECISION[status]


def _unchanged(proposal: dict, action: str, new_label: str | None) -> bool:
    if action == "revert":
        return proposal["status"] == "proposed"
    if action == "reject":
        return proposal["status"] == "rejected"
    if action == "accept":
        return proposal["status"] in ("accepted", "applied") and proposal["outcome"] == "remove"
    return proposal["status"] in ("accepted", "applied") and str(proposal["new_label"]) == str(new_label)
