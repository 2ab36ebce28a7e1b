"""The report's inline style sheet and script (no URLs anywhere: the file is self-contained)."""

CSS = """
:root { --ink: #222; --muted: #666; --line: #ddd; --accent: #1b9e77; --bg: #fafafa; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: var(--ink); background: var(--bg); }
main { max-width: 1180px; margin: 0 auto; padding: 0 24px 48px; background: #fff;
       min-height: 100vh; }
header { padding: 24px 0 8px; border-bottom: 2px solid var(--accent); }
h1 { margin: 0 0 4px; font-size: 26px; }
h2 { margin: 36px 0 8px; font-size: 21px; border-bottom: 1px solid var(--line);
     padding-bottom: 4px; }
h3 { margin: 24px 0 6px; font-size: 17px; }
p.lead { margin: 4px 0; color: var(--muted); }
nav { margin: 12px 0; font-size: 14px; max-width: 100%; }
nav .nav-main, nav .nav-layers { display: flex; flex-wrap: wrap; gap: 4px 14px; }
nav .nav-layers { gap: 4px 6px; margin-top: 8px; font-size: 12px; max-height: 9.5em;
                  overflow-y: auto; }
nav a { color: #1f5fa8; text-decoration: none; white-space: nowrap; }
nav a:hover { text-decoration: underline; }
nav a.chip { padding: 0 6px; border-radius: 9px; border: 1px solid #ccd; background: #fff; }
nav a.chip.lv-strong { background: #d7f0e6; border-color: #1b9e77; }
nav a.chip.lv-weak { background: #eef7f2; border-color: #8cc9b2; }
nav a.chip.lv-none, nav a.chip.lv-unknown { color: #888; }
.ev { display: inline-block; padding: 0 7px; border-radius: 9px; font-size: 12px;
      border: 1px solid #ccc; color: #555; background: #f4f4f4; }
.ev-strong { background: #1b9e77; border-color: #1b9e77; color: #fff; }
.ev-weak { background: #d7f0e6; border-color: #1b9e77; color: #135f49; }
.ev-none { background: #eee; color: #777; }
.verdict { font-size: 15px; background: #eef7f2; border-left: 4px solid var(--accent);
           padding: 8px 12px; }
p.say { font-size: 15px; margin: 6px 0; }
tr.ev-row-none td, tr.ev-row-unknown td { color: #888; }
td.say { text-align: left; min-width: 320px; font-size: 12px; }
#layer-table th:last-child { text-align: left; }
td.tops { text-align: left; font-size: 12px; }
.table-wrap.wide { max-height: 640px; }
tr.ns td { color: #aaa; }
tr.top td { background: #e6f4ee; }
.swatch { display: inline-block; width: 12px; height: 12px; vertical-align: -1px;
          border: 1px solid #ccc; }
.swatch.top { background: #e6f4ee; }
.swatch.ns { background: #fff; border-color: #aaa; }
dl.summary { display: grid; grid-template-columns: max-content 1fr; gap: 4px 18px;
             margin: 8px 0; }
dl.summary dt { font-weight: 600; color: var(--muted); }
dl.summary dd { margin: 0; word-break: break-word; }
figure { margin: 14px 0 22px; }
figure img { max-width: 100%; height: auto; display: block; border: 1px solid #eee; }
figcaption { font-size: 13px; color: var(--muted); margin-top: 4px; max-width: 900px; }
.note { background: #fff8e5; border-left: 4px solid #e6a700; padding: 8px 12px; margin: 10px 0;
        font-size: 14px; }
table { border-collapse: collapse; font-size: 13px; font-variant-numeric: tabular-nums; }
th, td { padding: 3px 10px; border-bottom: 1px solid #eee; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f0f3f7; position: sticky; top: 0; }
table.sortable th { cursor: pointer; user-select: none; white-space: nowrap; }
table.sortable th::after { content: " \\2195"; color: #aaa; }
table.sortable th[aria-sort="ascending"]::after { content: " \\25B2"; color: var(--ink); }
table.sortable th[aria-sort="descending"]::after { content: " \\25BC"; color: var(--ink); }
tr.dead td { color: #999; }
.table-wrap { max-height: 520px; overflow: auto; border: 1px solid var(--line); }
.controls { display: flex; gap: 14px; align-items: center; margin: 8px 0; flex-wrap: wrap; }
.controls input { font: inherit; padding: 4px 8px; width: 340px; border: 1px solid #bbb;
                  border-radius: 4px; }
.stats { font-size: 14px; color: var(--muted); }
footer { margin-top: 40px; font-size: 12px; color: var(--muted); }
"""

#: Style of the notebook fragment (:func:`pcace.viz.result_html`), scoped to its ``div``.
NOTEBOOK_CSS = """
.pcace-result { font: 13px/1.45 system-ui, sans-serif; }
.pcace-result table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
.pcace-result th, .pcace-result td { padding: 2px 8px; border-bottom: 1px solid #eee;
  text-align: right; }
.pcace-result th:first-child, .pcace-result td:first-child { text-align: left; }
.pcace-result td.say, .pcace-result td.tops { text-align: left; font-size: 12px; }
.pcace-result tr.ev-row-none td, .pcace-result tr.ev-row-unknown td { color: #888; }
.pcace-result .ev { padding: 0 6px; border-radius: 8px; border: 1px solid #ccc; }
.pcace-result .ev-strong { background: #1b9e77; color: #fff; }
.pcace-result .ev-weak { background: #d7f0e6; }
.pcace-result .verdict, .pcace-result .note { border-left: 4px solid #1b9e77;
  padding: 4px 10px; background: #f3faf7; }
.pcace-result .note { border-color: #e6a700; background: #fff8e5; }
.pcace-result .table-wrap { max-height: 420px; overflow: auto; }
"""

JS = """
(function () {
  "use strict";
  var table = document.getElementById("channel-table");
  var body = table.tBodies[0];
  var rows = Array.prototype.slice.call(body.rows);
  var filter = document.getElementById("channel-filter");
  var count = document.getElementById("channel-count");

  function cellValue(row, col, numeric) {
    var cell = row.cells[col];
    var raw = cell.getAttribute("data-v");
    if (raw === null) { raw = cell.textContent; }
    if (!numeric) { return raw.toLowerCase(); }
    var v = parseFloat(raw);
    return isNaN(v) ? -Infinity : v;
  }

  function sortBy(th) {
    var col = th.cellIndex;
    var numeric = th.getAttribute("data-type") === "number";
    var asc = th.getAttribute("aria-sort") !== "ascending";
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (h) {
      h.removeAttribute("aria-sort");
    });
    th.setAttribute("aria-sort", asc ? "ascending" : "descending");
    var keyed = rows.map(function (r, i) { return [cellValue(r, col, numeric), i, r]; });
    keyed.sort(function (a, b) {
      if (a[0] < b[0]) { return asc ? -1 : 1; }
      if (a[0] > b[0]) { return asc ? 1 : -1; }
      return a[1] - b[1];
    });
    var frag = document.createDocumentFragment();
    keyed.forEach(function (k) { frag.appendChild(k[2]); });
    body.appendChild(frag);
    rows = keyed.map(function (k) { return k[2]; });
  }

  function matches(row, tokens) {
    var layer = row.getAttribute("data-layer").toLowerCase();
    var channel = row.getAttribute("data-channel");
    return tokens.every(function (t) {
      var pair = t.split(":");
      if (pair.length === 2 && pair[1] !== "") {
        return layer.indexOf(pair[0]) !== -1 && channel === pair[1];
      }
      return layer.indexOf(t) !== -1 || channel === t;
    });
  }

  function applyFilter() {
    var tokens = filter.value.toLowerCase().split(/\\s+/).filter(Boolean);
    var shown = 0;
    rows.forEach(function (r) {
      var ok = tokens.length === 0 || matches(r, tokens);
      r.style.display = ok ? "" : "none";
      if (ok) { shown += 1; }
    });
    count.textContent = shown + " of " + rows.length + " channels shown";
    table.setAttribute("data-shown", String(shown));
  }

  Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th) {
    th.addEventListener("click", function () { sortBy(th); });
    th.setAttribute("title", "click to sort");
  });
  filter.addEventListener("input", applyFilter);
  applyFilter();
  document.body.setAttribute("data-ready", "1");
})();
"""
