"""Self-contained HTML pages: the review page (mark keep / relabel / remove, export a CSV) and the ranking page.

One file each, with the thumbnails inlined as base64 JPEGs and no outside scripts, styles or
fonts, so a page opened from disk works offline and can be sent as an attachment. The review page
keeps the marks in the browser's localStorage (a reload does not lose work) and exports them as
`decisions.csv` (`path,given_label,decision,label`), the format `imgclf train --exclude/--relabel`
reads (`imgclf.data.decisions`).
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from imgclf.data.decode import open_image
from imgclf.data.pipeline import default_workers
from imgclf.progress import progress

THUMBNAIL_PX = 96  # longer side of a thumbnail: big enough to judge a label, ~3 KB as JPEG
MAX_PAGE_ROWS = 2000  # rows on a page (the CSV has all): 2,000 thumbnails are ~6 MB of HTML


def thumbnail(path: str) -> str:
    """A `data:` URI of a small JPEG of the image, or "" when it cannot be read.

    Example:
        >>> thumbnail("photos/cat/1.jpg")[:23]  # doctest: +SKIP
        'data:image/jpeg;base64,'
    """
    try:
        image = open_image(path, draft_size=THUMBNAIL_PX)
        image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
    except Exception:  # an unreadable file gets an empty box, not a failed page
        return ""
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def thumbnails(paths: Sequence[str], *, desc: str = "thumbnails") -> list[str]:
    """`thumbnail` of every path, decoded in threads (Pillow releases the GIL)."""
    bar = progress(total=len(paths), desc=desc)
    out: list[str] = []
    with ThreadPoolExecutor(default_workers(0)) as pool:
        for uri in pool.map(thumbnail, paths):
            out.append(uri)
            bar.update(1)
    bar.close()
    return out


def _json_for_script(value: Any) -> str:
    """JSON that is safe inside a <script> element (no `</script>` can end it early)."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


_STYLE = """
body{font:14px system-ui,sans-serif;margin:1.5rem;color:#222}
h1{font-size:1.3rem;margin:0 0 .3rem}
.meta{color:#555;margin-bottom:1rem}
table{border-collapse:collapse;width:100%}
th,td{border-bottom:1px solid #ddd;padding:.35rem .5rem;text-align:left;vertical-align:middle}
th{background:#f4f4f4;position:sticky;top:0}
td.path{font-family:monospace;font-size:12px;word-break:break-all;max-width:28rem}
img{width:96px;height:96px;object-fit:contain;background:#eee}
.kind-label{color:#a40}.kind-outlier{color:#06a}.kind-duplicate{color:#555}
.bar{display:flex;gap:1rem;align-items:center;margin:.8rem 0;flex-wrap:wrap}
button{font:inherit;padding:.35rem .8rem}
"""

_REVIEW_SCRIPT = """
const DATA = JSON.parse(document.getElementById('rows').textContent);
const CLASSES = JSON.parse(document.getElementById('classes').textContent);
const KEY = 'imgclf-review:' + document.getElementById('key').textContent;
const saved = JSON.parse(localStorage.getItem(KEY) || '{}');
const body = document.querySelector('#issues tbody');
function cell(text, cls) { const td = document.createElement('td'); td.textContent = text;
  if (cls) td.className = cls; return td; }
DATA.forEach((row, i) => {
  const tr = document.createElement('tr'); tr.dataset.index = i;
  const img = document.createElement('td'); const pic = document.createElement('img');
  pic.src = row.thumbnail; pic.alt = row.path; img.appendChild(pic); tr.appendChild(img);
  tr.appendChild(cell(row.path, 'path')); tr.appendChild(cell(row.given_label));
  tr.appendChild(cell(row.suggested_label)); tr.appendChild(cell(row.score.toFixed(3)));
  tr.appendChild(cell(row.kind + (row.note ? ' (' + row.note + ')' : ''), 'kind-' + row.kind));
  const choice = document.createElement('td');
  const decision = document.createElement('select'); decision.className = 'decision';
  ['keep', 'relabel', 'remove'].forEach(d => decision.add(new Option(d, d)));
  const label = document.createElement('select'); label.className = 'label';
  CLASSES.forEach(c => label.add(new Option(c, c)));
  const mine = saved[row.path] || {};
  decision.value = mine.decision || 'keep';
  label.value = mine.label || (CLASSES.includes(row.suggested_label) ? row.suggested_label : row.given_label);
  label.disabled = decision.value !== 'relabel';
  const remember = () => { label.disabled = decision.value !== 'relabel';
    saved[row.path] = {decision: decision.value, label: label.value};
    localStorage.setItem(KEY, JSON.stringify(saved)); count(); };
  decision.addEventListener('change', remember); label.addEventListener('change', remember);
  choice.appendChild(decision); choice.appendChild(label); tr.appendChild(choice);
  body.appendChild(tr);
});
function quote(v) { v = String(v); return /[",\\n\\r]/.test(v) ? '"' + v.replace(/"/g, '""') + '"' : v; }
function decisionsCsv() {
  const lines = ['path,given_label,decision,label'];
  document.querySelectorAll('#issues tbody tr').forEach(tr => {
    const row = DATA[+tr.dataset.index]; const d = tr.querySelector('.decision').value;
    const label = d === 'relabel' ? tr.querySelector('.label').value : '';
    lines.push([row.path, row.given_label, d, label].map(quote).join(','));
  });
  return lines.join('\\n') + '\\n';
}
function count() {
  const n = {keep: 0, relabel: 0, remove: 0};
  document.querySelectorAll('.decision').forEach(s => n[s.value]++);
  document.getElementById('counts').textContent =
    `${n.keep} keep, ${n.relabel} relabel, ${n.remove} remove`;
}
document.getElementById('export').addEventListener('click', () => {
  const blob = new Blob([decisionsCsv()], {type: 'text/csv'});
  const a = document.createElement('a'); a.href = URL.createObjectURL(blob); a.download = 'decisions.csv';
  document.body.appendChild(a); a.click(); a.remove();
});
document.getElementById('remove-all').addEventListener('click', () => {
  document.querySelectorAll('.decision').forEach(s => { s.value = 'remove';
    s.dispatchEvent(new Event('change')); });
});
count();
document.getElementById('status').textContent = 'ready';
"""


def review_page(
    rows: Sequence[dict[str, Any]], *, classes: Sequence[str], title: str, summary: str, key: str, note: str = "",
) -> str:
    """The review page's HTML. Each row: path, given_label, suggested_label, score, kind, thumbnail (a
    `data:` URI), note. `key` names the page's saved marks in localStorage (one per review folder).

    Example:
        >>> page = review_page([], classes=["cat", "dog"], title="review", summary="0 issues", key="x")
        >>> "decisions.csv" in page
        True
    """
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<div class="meta">{html.escape(summary)}</div>
<div class="meta">Mark each image <b>keep</b>, <b>relabel</b> (pick the label) or <b>remove</b>, then export
the decisions and train with <code>imgclf train DATA --exclude decisions.csv --relabel decisions.csv</code>.
Your marks are kept in this browser until you export. {html.escape(note)}</div>
<div class="bar"><button id="export">Export decisions (CSV)</button>
<button id="remove-all">Mark all remove</button><span id="counts"></span>
<span id="status" class="meta">loading</span></div>
<table id="issues"><thead><tr><th>image</th><th>path</th><th>given</th><th>suggested</th><th>score</th>
<th>kind</th><th>decision</th></tr></thead><tbody></tbody></table>
<script type="application/json" id="rows">{_json_for_script(list(rows))}</script>
<script type="application/json" id="classes">{_json_for_script(list(classes))}</script>
<script type="text/plain" id="key">{html.escape(key)}</script>
<script>{_REVIEW_SCRIPT}</script>
</body></html>
"""


def ranking_page(rows: Sequence[dict[str, Any]], *, title: str, summary: str) -> str:
    """The ranking page's HTML: thumbnails in rank order with the model's guess and the scores.

    Each row: rank, path, guess, probability, uncertainty, thumbnail.

    Example:
        >>> "<table" in ranking_page([], title="to label next", summary="0 images")
        True
    """
    body = "\n".join(
        f"<tr><td>{r['rank']}</td><td><img src=\"{html.escape(r['thumbnail'])}\" alt=\"\"></td>"
        f"<td class=\"path\">{html.escape(r['path'])}</td><td>{html.escape(r['guess'])}</td>"
        f"<td>{r['probability']:.3f}</td><td>{r['uncertainty']:.3f}</td></tr>"
        for r in rows
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_STYLE}</style></head>
<body><h1>{html.escape(title)}</h1><div class="meta">{html.escape(summary)}</div>
<table id="ranking"><thead><tr><th>rank</th><th>image</th><th>path</th><th>model's guess</th><th>probability</th>
<th>uncertainty</th></tr></thead><tbody>
{body}
</tbody></table></body></html>
"""
