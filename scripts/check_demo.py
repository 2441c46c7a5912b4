"""CI check of README's first command: it left a store with a finished run, proposals and a report."""

import re
import sqlite3
import sys
from pathlib import Path

db = sqlite3.connect("influence-store.db")
runs = db.execute("SELECT count(*) FROM runs WHERE status = 'done'").fetchone()[0]
proposals = db.execute("SELECT count(*) FROM proposals").fetchone()[0]
scores = db.execute("SELECT coalesce(sum(length(scores) / CASE encoding WHEN '<f4' THEN 4 ELSE 8 END), 0) "
                    "FROM score_blocks").fetchone()[0]  # every score, one block per test example (docs/store.md)
report = Path("influence-store-report.html")
images = len(re.findall("data:image/png;base64,", report.read_text())) if report.exists() else 0
print(f"demo: {runs} finished run(s), {scores} scores, {proposals} proposals, report with {images} images")
if not (runs >= 1 and proposals >= 1 and scores >= 1 and images >= 2):
    sys.exit("demo check failed: expected a finished run, scores, proposals and a report with plots")
