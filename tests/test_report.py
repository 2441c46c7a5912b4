"""The HTML report and the demo on the bundled noisy-digits example."""

import json
from html.parser import HTMLParser

from click.testing import CliRunner

import influence_store.cli.commands  # noqa: F401  (attaches the commands)
from influence_store.cli.main import cli


class Tables(HTMLParser):
    """Collects the rows of every table with an id, and the image sources."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self._table, self._row, self._cell = {}, [], None, None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table" and attrs.get("id"):
            self._table = self.tables.setdefault(attrs["id"], [])
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""
        elif tag == "img":
            self.images.append(attrs["src"])

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self._table.append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None


def invoke(*args):
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_report_lists_the_same_top_harmful_examples_as_scores(digits_store, tmp_path):
    store, run_id = digits_store
    invoke("propose", str(run_id), "--rule", "harmful", "--top", "5")
    out = tmp_path / "report.html"
    invoke("report", str(run_id), "-o", str(out), "--top", "10")
    page = Tables()
    page.feed(out.read_text())
    page.close()
    assert len(page.images) >= 2 and all(src.startswith("data:image/png;base64,") for src in page.images)
    header, *rows = page.tables["harmful-aggregate"]
    report_keys = [row[header.index("key")] for row in rows]
    scores = json.loads(invoke("scores", str(run_id), "--top", "10", "--json"))
    assert report_keys == [r["key"] for r in scores["harmful"]]
    proposal_header, *proposal_rows = page.tables["proposals"]
    assert [r[proposal_header.index("key")] for r in proposal_rows] == report_keys[:5]
    assert {r[proposal_header.index("status")] for r in proposal_rows} == {"proposed"}


def test_report_of_unknown_run_is_one_line(digits_store, tmp_path):
    result = CliRunner().invoke(cli, ["report", "99", "-o", str(tmp_path / "r.html")])
    assert result.exit_code == 1
    assert "no run 99" in result.output and "Traceback" not in result.output


def test_demo_top_proposals_are_mostly_flipped_labels(digits_store, tmp_path, monkeypatch):
    """The bundled example flips 10% of the training labels; the demo's proposals must be far richer in them."""
    monkeypatch.chdir(tmp_path)
    output = invoke("demo", "--quiet", "--top", "20")
    summary = json.loads(output.strip().splitlines()[-1])
    assert summary["proposals"] == 40
    share = summary["flipped"] / summary["proposals"]
    assert share >= 0.8, share  # 8x the flip rate; measured: 40/40
    assert (tmp_path / "influence-store-report.html").exists()
