"""A self-contained HTML report of one run: score distribution, most harmful and helpful training
examples (aggregated and per test example), self-influence against training loss, proposals with
their review state, and predicted vs actual effect where a verification exists."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InfluenceStoreError
from .files import check_output_path, write_atomic

if TYPE_CHECKING:
    from .store import Store

STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;
text-align:left}th{background:#f3f3f3}.neg{color:#b00}.pos{color:#070}img{max-width:100%}img.example{width:48px;height:48px;image-rendering:pixelated}code{background:#f5f5f5}"""


def build_report(store: Store, run_id: int, top: int = 10, per_test: int = 5) -> str:
    """The report's HTML text."""
    run = store.run(run_id)
    if run["status"] != "done":
        raise InfluenceStoreError(f"run {run_id} is {run['status']}; report on a finished run")
    aggregate = store.top_aggregate(run["id"], top)
    self_influence = store.self_influence(run["id"])
    proposals = store.proposals(run_id=run["id"])
    verifications = store.verifications(run["id"])
    tests = store.run_examples(run["id"], "test")
    hardest = sorted(tests, key=lambda e: -tests[e]["loss"])[:per_test]
    test_examples = store.examples(hardest)

    parts = [f"<h1>influence-store report: run {run['id']}</h1>", _provenance(run)]
    parts.append("<h2>Score distribution</h2>" + _img(_histogram(store.score_values(run["id"]))))
    parts.append("<h2>Most harmful training examples (aggregated over the test set)</h2>"
                 + _table(aggregate["harmful"], ["key", "label", "sum", "mean", "hurts", "loss", "self_influence"],
                          "harmful-aggregate"))
    parts.append("<h2>Most helpful training examples (aggregated over the test set)</h2>"
                 + _table(aggregate["helpful"], ["key", "label", "sum", "mean", "hurts", "loss", "self_influence"],
                          "helpful-aggregate"))
    parts.append(f"<h2>Per test example ({per_test} highest test losses)</h2>")
    for e in hardest:
        info = test_examples[e]
        result = store.top_scores(run["id"], info["key"], min(top, 5))
        parts.append(f"<h3>test <code>{html.escape(info['key'])}</code> (label {html.escape(str(info['label']))}, "
                     f"loss {tests[e]['loss']:.4g})</h3>"
                     + "<p>harmful</p>" + _table(result["harmful"], ["key", "label", "score", "loss"])
                     + "<p>helpful</p>" + _table(result["helpful"], ["key", "label", "score", "loss"]))
    if self_influence:
        status = {p["example_id"]: p["status"] for p in proposals}
        parts.append("<h2>Self-influence against training loss</h2><p>Training loss is the baseline: examples high "
                     "on self-influence but not on loss are what influence adds.</p>"
                     + _img(_scatter(self_influence, status)))
    pictures = _pictures(store, run, proposals)
    parts.append("<h2>Removal proposals</h2>" + _table(
        [{**p, "picture": pictures.get(p["example_id"], ""), "new_label": p.get("new_label"),
          "evidence": evidence_text(p["evidence"])} for p in proposals],
        ["id", "picture", "rule", "rank", "key", "label", "status", "new_label", "reviewer", "note", "evidence"],
        "proposals"))
    if verifications:
        parts.append("<h2>Verification: predicted vs actual change of the mean test loss</h2>" + _table(
            verifications, ["id", "n_removed", "predicted_loss_change", "actual_loss_change", "loss_before",
                            "loss_after", "accuracy_before", "accuracy_after", "actor", "created_utc"], "verifications")
            + _img(_effect_plot(verifications)))
    body = "\n".join(parts)
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>influence-store run {run['id']}</title>"
            f"<style>{STYLE}</style></head><body>\n{body}\n</body></html>\n")


def write_report(store: Store, run_id: int, output: str, top: int = 10, force: bool = True) -> str:
    path = Path(output)
    check_output_path(path)
    if path.exists() and not force:
        raise InfluenceStoreError("{path!r} exists; pass {force} to overwrite it", path=output, force="force=True")
    write_atomic(path, build_report(store, run_id, top))
    return str(path)


def _provenance(run: dict) -> str:
    rows = [("model version", run["model_version"]), ("task", run["task_spec"]),
            ("train / test", f"{run['train_dataset']} ({run['n_train']}) / {run['test_dataset']} ({run['n_test']})"),
            ("approximator", f"{run['approximator']} {json.dumps(run['options'])}"),
            ("freezing", f"{run['freeze']} {json.dumps(run['freeze_options'])} ({run['num_params']} parameters)"),
            ("effective damping", run["effective_damping"]), ("seed / device", f"{run['seed']} / {run['device']}"),
            ("sign convention", run["sign_convention"]), ("versions", json.dumps(run["versions"])),
            ("time", f"{run['seconds_total']:.1f} s (writing {run['seconds_writing']:.2f} s), finished "
                     f"{run['finished_utc']}")]
    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                               for k, v in rows) + "</table>"


def _pictures(store: Store, run: dict, proposals: list[dict]) -> dict[int, str]:
    """Example id -> the example as its stored payload renders (an <img>, or short text), escaped HTML."""
    from .render import StoredRenderer

    renderer = StoredRenderer()
    out = {}
    for example_id, example in store.examples(p["example_id"] for p in proposals).items():
        rendering = renderer.render(example, run)
        if rendering.png is not None:
            out[example_id] = (f"<img class='example' alt='example {html.escape(example['key'])}' "
                               f"src='{rendering.data_uri()}'>")
        elif rendering.text:
            out[example_id] = html.escape(rendering.text[:200])
    return out


def evidence_text(evidence: dict) -> str:
    """A proposal's evidence on one line for people (``hurts=12, sum=-0.03412``); JSON keeps every digit."""
    return ", ".join(f"{key}={_fmt(value)}" for key, value in evidence.items())


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _table(rows: list[dict], columns: list[str], table_id: str | None = None) -> str:
    if not rows:
        return "<p>(none)</p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c)
            cls = ""
            if isinstance(value, float) and c in ("score", "sum", "mean"):
                cls = " class='neg'" if value < 0 else " class='pos'"
            text = value if c == "picture" else html.escape(_fmt(value) if value is not None else "")  # built escaped
            cells.append(f"<td{cls}>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    ident = f" id='{table_id}'" if table_id else ""
    return f"<table{ident}><tr>{head}</tr>{''.join(body)}</table>"


def _figure():
    """A figure and its axes, without pyplot's global state (Agg renders it; nothing to close)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.6), dpi=90)
    return fig, fig.subplots()


def _img(fig) -> str:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    data = base64.b64encode(buffer.getvalue()).decode()
    return f"<img alt='plot' src='data:image/png;base64,{data}'>"


def _histogram(values: list[float]):
    fig, ax = _figure()
    ax.hist(values, bins=100, color="#4477aa")
    ax.set_yscale("log")
    ax.set_xlabel("score (positive = helpful, negative = harmful)")
    ax.set_ylabel("count")
    return fig


def _scatter(rows: list[dict], status: dict[int, str]):
    fig, ax = _figure()
    colors = {"proposed": "#ee7733", "accepted": "#cc3311", "applied": "#882255", "rejected": "#999933"}
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(status.get(r["example_id"], "not proposed"), []).append(r)
    for name, members in sorted(groups.items()):
        ax.scatter([m["loss"] for m in members], [m["self_influence"] for m in members], s=8,
                   color=colors.get(name, "#bbbbbb"), label=f"{name} ({len(members)})")
    ax.set_xlabel("training loss")
    ax.set_ylabel("self-influence")
    ax.legend(fontsize=8)
    return fig


def _effect_plot(verifications: list[dict]):
    fig, ax = _figure()
    predicted = [v["predicted_loss_change"] for v in verifications]
    actual = [v["actual_loss_change"] for v in verifications]
    ax.scatter(predicted, actual, color="#4477aa")
    low, high = min(predicted + actual), max(predicted + actual)
    ax.plot([low, high], [low, high], color="#999", linestyle="--", linewidth=1)
    ax.set_xlabel("predicted change of mean test loss")
    ax.set_ylabel("actual change (retrained)")
    return fig
