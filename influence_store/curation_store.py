"""The curation record of ``Store``: model versions and their lineage, removal proposals with every
review event, and verifications of what a removal did.

Part of the store (it speaks SQL); ``Store`` inherits these verbs. A proposal's status moves only through
``decide`` (reviews, from the CLI, a decisions file or the review page) and ``apply_removals`` (export),
and every move is kept as a ``proposal_events`` row, so the record says who decided what, when and why.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .errors import InfluenceStoreError
from .schema import Dataset, Example, ModelVersion, Proposal, ProposalEvent, Run, RunExample, Verification, utcnow


class CurationStore:
    """Model-version, proposal and verification verbs of ``Store`` (a mixin: it uses the store's sessions,
    dataset ids and example lookups)."""

    # -- model versions ---------------------------------------------------------------------------

    def version(self, name: str) -> dict:
        with self._session(read=True) as s:
            found = s.scalar(select(ModelVersion).where(ModelVersion.name == name))
            if found is None:
                names = s.scalars(select(ModelVersion.name).order_by(ModelVersion.id)).all()
                raise InfluenceStoreError("no model version {name!r}; known versions: {known} (register one with "
                                          "{versions_add})", name=name, known=", ".join(names) or "(none)",
                                          versions_add=f"store.add_version({name!r})")
            return self._version_dict(s, found)

    def _version_dict(self, s: Session, v: ModelVersion) -> dict:
        parent = s.get(ModelVersion, v.parent_id) if v.parent_id else None
        dataset = s.get(Dataset, v.dataset_id) if v.dataset_id else None
        runs = s.scalar(select(func.count()).select_from(Run).where(Run.model_version_id == v.id))
        return {"id": v.id, "name": v.name, "parent": parent.name if parent else None,
                "checkpoint_path": v.checkpoint_path, "checkpoint_sha256": v.checkpoint_sha256,
                "weights_sha256": v.weights_sha256, "dataset": dataset.name if dataset else None,
                "created_utc": v.created_utc, "notes": v.notes, "runs": runs}

    def add_version(self, name: str, parent: str | None = None, checkpoint_path: str | None = None,
                    checkpoint_sha256: str | None = None, dataset: str | None = None, notes: str | None = None,
                    weights_sha256: str | None = None) -> dict:
        with self._session() as s:
            return self._add_version(s, name, parent=parent, checkpoint_path=checkpoint_path,
                                     checkpoint_sha256=checkpoint_sha256, dataset=dataset, notes=notes,
                                     weights_sha256=weights_sha256)

    def _add_version(self, s: Session, name: str, parent: str | None = None, checkpoint_path: str | None = None,
                     checkpoint_sha256: str | None = None, dataset: str | None = None, notes: str | None = None,
                     weights_sha256: str | None = None) -> dict:
        """``add_version`` inside a transaction the caller holds (export creates a version and applies removals)."""
        check_version_name(name)
        if s.scalar(select(ModelVersion.id).where(ModelVersion.name == name)) is not None:
            raise InfluenceStoreError(f"model version {name!r} already exists; choose a new name")
        parent_id = None
        if parent is not None:
            parent_id = s.scalar(select(ModelVersion.id).where(ModelVersion.name == parent))
            if parent_id is None:
                raise InfluenceStoreError("parent version {parent!r} does not exist; see {versions_list}",
                                          parent=parent, versions_list="store.versions()")
        dataset_id = self._dataset_id(s, dataset) if dataset else None
        version = ModelVersion(name=name, parent_id=parent_id, checkpoint_path=checkpoint_path,
                               checkpoint_sha256=checkpoint_sha256, dataset_id=dataset_id, notes=notes,
                               weights_sha256=weights_sha256)
        s.add(version)
        s.flush()
        return self._version_dict(s, version)

    def version_for_weights(self, weights_sha256: str) -> str | None:
        """The oldest model version recorded with exactly these weights, if any."""
        with self._session(read=True) as s:
            return s.scalar(select(ModelVersion.name).where(ModelVersion.weights_sha256 == weights_sha256)
                            .order_by(ModelVersion.id).limit(1))

    def versions(self) -> list[dict]:
        with self._session(read=True) as s:
            return [self._version_dict(s, v) for v in s.scalars(select(ModelVersion).order_by(ModelVersion.id))]

    def set_checkpoint(self, name: str, path: str, sha256: str, notes: str | None) -> dict:
        """Record the checkpoint of a version created earlier without one (e.g. by ``export``)."""
        with self._session() as s:
            version = s.scalar(select(ModelVersion).where(ModelVersion.name == name))
            if version.checkpoint_sha256 is not None:
                raise InfluenceStoreError(f"model version {name!r} already exists with a checkpoint; choose a new name")
            version.checkpoint_path, version.checkpoint_sha256 = path, sha256
            version.notes = notes or version.notes
            return self._version_dict(s, version)

    # -- proposals --------------------------------------------------------------------------------

    def open_removals(self, dataset_id: int) -> dict[int, dict]:
        """Example id -> its newest proposal that is proposed, accepted or applied, for one dataset."""
        with self._session(read=True) as s:
            rows = s.execute(select(Proposal).join(Example, Example.id == Proposal.example_id).where(
                Example.dataset_id == dataset_id, Proposal.status.in_(("proposed", "accepted", "applied")))
                .order_by(Proposal.id)).scalars()
            return {p.example_id: _proposal_dict(p) for p in rows}

    def add_proposals(self, run_id: int, rule: str, rule_options: dict, candidates: Sequence[tuple[int, dict]],
                      actor: str) -> list[int]:
        """Store (example id, evidence) candidates as proposals, each with its creation event."""
        with self._session() as s:
            train = set(s.scalars(select(RunExample.example_id).where(
                RunExample.run_id == run_id, RunExample.split == "train")))
            ids = []
            for rank, (example_id, evidence) in enumerate(candidates, start=1):
                if example_id not in train:  # test or validation examples are never proposed for removal
                    raise InfluenceStoreError(f"rule {rule!r} proposed example {example_id}, which is not a "
                                              f"training example of run {run_id}; fix the rule")
                proposal = Proposal(run_id=run_id, example_id=example_id, rule=rule,
                                    rule_options_json=json.dumps(rule_options, default=str), rank=rank,
                                    evidence_json=json.dumps(evidence, default=float), status="proposed")
                s.add(proposal)
                s.flush()
                s.add(ProposalEvent(proposal_id=proposal.id, from_status=None, to_status="proposed", actor=actor,
                                    note=f"rule {rule}"))
                ids.append(proposal.id)
            return ids

    def proposals(self, ids: Sequence[int] | None = None, status: str | None = None, rule: str | None = None,
                  run_id: int | None = None, dataset: str | None = None,
                  applied_version: str | None = None) -> list[dict]:
        query = (select(Proposal).join(Example, Example.id == Proposal.example_id)
                 .join(Dataset, Dataset.id == Example.dataset_id).order_by(Proposal.id))
        if ids is not None:
            storable = [int(i) for i in ids if 0 < int(i) < 2**63]  # any other id names no proposal
            query = query.where(Proposal.id.in_(storable))
        if status is not None:
            query = query.where(Proposal.status == status)
        if rule is not None:
            query = query.where(Proposal.rule == rule)
        if run_id is not None:
            query = query.where(Proposal.run_id == run_id)
        if dataset is not None:
            query = query.where(Dataset.name == dataset)
        if applied_version is not None:
            query = query.join(ModelVersion, ModelVersion.id == Proposal.applied_version_id).where(
                ModelVersion.name == applied_version)
        with self._session(read=True) as s:
            found = [_proposal_dict(p) for p in s.scalars(query)]
        examples = self.examples(p["example_id"] for p in found)
        for p in found:
            example = examples[p["example_id"]]
            p.update(key=example["key"], label=example["label"], dataset=example["dataset"])
        return found

    def proposal_events(self, proposal_id: int) -> list[dict]:
        query = select(ProposalEvent).where(ProposalEvent.proposal_id == proposal_id).order_by(ProposalEvent.id)
        with self._session(read=True) as s:
            return [_event_dict(e) for e in s.scalars(query)]

    # -- reviews ----------------------------------------------------------------------------------

    def transition(self, ids: Sequence[int], allowed: dict[str, str], actor: str, note: str | None,
                   applied_version: str | None = None, new_label: Any = None) -> list[dict]:
        """Move proposals along ``allowed`` (from status -> to status), all or none, one event each.
        ``new_label`` (not None) makes an acceptance a relabel; any other transition clears it."""
        version_id = None
        if applied_version is not None:
            with self._session(read=True) as s:
                version_id = s.scalar(select(ModelVersion.id).where(ModelVersion.name == applied_version))
        return self.decide([(pid, allowed, note, new_label) for pid in ids], actor, version_id)

    def decide(self, decisions: Sequence[tuple[int, dict[str, str], str | None, Any]], actor: str,
               applied_version_id: int | None = None) -> list[dict]:
        """Apply (proposal id, allowed transitions, note, new label or None) decisions, all or none, one
        event each: the one verb every review path (CLI, file import, web page) writes through."""
        with self._session() as s:
            changed = []
            for pid, allowed, note, new_label in decisions:
                proposal = s.get(Proposal, int(pid)) if 0 < int(pid) < 2**63 else None
                if proposal is None:
                    raise InfluenceStoreError("no proposal {pid}; see {proposals_list}", pid=pid,
                                              proposals_list="store.proposals()")
                if proposal.status not in allowed:
                    target = next(iter(allowed.values()))
                    final = " (applied removals are final)" if proposal.status == "applied" else ""
                    raise InfluenceStoreError(f"proposal {pid} is {proposal.status}; only {' or '.join(allowed)} "
                                              f"proposals can become {target}{final}")
                before, proposal.status = proposal.status, allowed[proposal.status]
                proposal.reviewer, proposal.note, proposal.updated_utc = actor, note, utcnow()
                proposal.new_label_json = None if new_label is None else json.dumps(new_label)
                if applied_version_id is not None:
                    proposal.applied_version_id = applied_version_id
                s.add(ProposalEvent(proposal_id=proposal.id, from_status=before, to_status=proposal.status,
                                    actor=actor, note=note, new_label_json=proposal.new_label_json))
                changed.append(_proposal_dict(proposal))
            return changed

    # -- applying removals ------------------------------------------------------------------------

    def apply_removals(self, ids: Sequence[int], version: str, parent: str | None, dataset: str, actor: str,
                       note: str | None) -> dict:
        """Create model version ``version`` and mark the accepted proposals ``ids`` applied in it, atomically."""
        with self._session() as s:
            created = self._add_version(s, version, parent=parent, dataset=dataset,
                                        notes=note or f"exported without {len(ids)} removals")
            for pid in ids:
                proposal = s.get(Proposal, int(pid))
                if proposal is None or proposal.status != "accepted":
                    raise InfluenceStoreError(f"proposal {pid} is no longer accepted; export again")
                proposal.status, proposal.applied_version_id = "applied", created["id"]
                proposal.updated_utc = utcnow()
                if proposal.new_label_json is None:
                    done = "removed"
                else:
                    done = f"relabelled to {proposal.new_label_json}"
                s.add(ProposalEvent(proposal_id=proposal.id, from_status="accepted", to_status="applied",
                                    actor=actor, note=f"exported; {done} in model version {version}",
                                    new_label_json=proposal.new_label_json))
            return created

    def removed_in_lineage(self, version: str) -> dict[tuple[str, str], dict]:
        """(key, content hash) -> applied proposal, for removals applied in ``version`` or its ancestors.

        A version not registered yet has no known lineage, so every applied removal counts: a model
        retrained on the uncurated data under a new name must not bring removed examples back silently.
        """
        with self._session(read=True) as s:
            lineage = []
            current = s.scalar(select(ModelVersion).where(ModelVersion.name == version))
            while current is not None and current.id not in lineage:
                lineage.append(current.id)
                current = s.get(ModelVersion, current.parent_id) if current.parent_id else None
            query = (select(Proposal, Example.key, Example.content_hash)
                     .join(Example, Example.id == Proposal.example_id).where(Proposal.status == "applied"))
            if lineage:
                query = query.where(Proposal.applied_version_id.in_(lineage))
            rows = s.execute(query).all()
            return {(key, content_hash): _proposal_dict(p) for p, key, content_hash in rows}

    # -- verifications ----------------------------------------------------------------------------

    def add_verification(self, **values: Any) -> int:
        columns = dict(values, proposal_ids_json=json.dumps(values["proposal_ids_json"]))
        with self._session() as s:
            row = Verification(**columns)
            s.add(row)
            s.flush()
            return row.id

    def verifications(self, run_id: int | None = None) -> list[dict]:
        query = select(Verification).order_by(Verification.id)
        if run_id is not None:
            query = query.where(Verification.run_id == run_id)
        with self._session(read=True) as s:
            found = []
            for v in s.scalars(query):
                row = {c.name: getattr(v, c.key) for c in Verification.__table__.columns}
                row["proposal_ids"] = json.loads(v.proposal_ids_json)
                found.append(row)
            return found


def _proposal_dict(p: Proposal) -> dict:
    return {"id": p.id, "run_id": p.run_id, "example_id": p.example_id, "rule": p.rule, "rank": p.rank,
            "status": p.status, "evidence": json.loads(p.evidence_json),
            "rule_options": json.loads(p.rule_options_json), "reviewer": p.reviewer, "note": p.note,
            "applied_version_id": p.applied_version_id, "created_utc": p.created_utc,
            "new_label": _json_or_none(p.new_label_json),
            "outcome": _outcome(p),
            "updated_utc": p.updated_utc}


def _event_dict(e: ProposalEvent) -> dict:
    return {"from": e.from_status, "to": e.to_status, "actor": e.actor, "note": e.note, "time_utc": e.created_utc,
            "new_label": _json_or_none(e.new_label_json)}


def _outcome(p: Proposal) -> str | None:
    """What an accepted or applied proposal does to its example: ``remove`` or ``relabel``."""
    if p.status not in ("accepted", "applied"):
        return None
    return "remove" if p.new_label_json is None else "relabel"


def _json_or_none(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def check_version_name(name: str) -> None:
    """A model version is referred to by name: an empty or blank one could never be named again."""
    if not name.strip():
        raise InfluenceStoreError(f"model version name {name!r} is blank; give a name")
