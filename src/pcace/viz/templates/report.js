(function () {
  "use strict";
  // One script for every page pcace writes: each part runs only where its elements are.
  var each = function (list, fn) { Array.prototype.forEach.call(list, fn); };

  function cellValue(row, col, numeric) {
    var cell = row.cells[col];
    var raw = cell ? cell.getAttribute("data-v") : "";
    if (raw === null) { raw = cell.textContent; }
    if (!numeric) { return raw.toLowerCase(); }
    var v = parseFloat(raw);
    return isNaN(v) ? -Infinity : v;
  }

  // Every table.sortable: a click on a header sorts by that column (again: reversed).
  function sortable(table) {
    var head = table.tHead && table.tHead.rows[0];
    var body = table.tBodies[0];
    if (!head || !body) { return; }
    function sortBy(th) {
      var col = th.cellIndex;
      var numeric = th.getAttribute("data-type") === "number";
      var asc = th.getAttribute("aria-sort") !== "ascending";
      each(head.cells, function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", asc ? "ascending" : "descending");
      var keyed = Array.prototype.map.call(body.rows, function (r, i) {
        return [cellValue(r, col, numeric), i, r];
      });
      keyed.sort(function (a, b) {
        if (a[0] < b[0]) { return asc ? -1 : 1; }
        if (a[0] > b[0]) { return asc ? 1 : -1; }
        return a[1] - b[1];
      });
      var frag = document.createDocumentFragment();
      keyed.forEach(function (k) { frag.appendChild(k[2]); });
      body.appendChild(frag);
    }
    each(head.cells, function (th) {
      th.addEventListener("click", function () { sortBy(th); });
      th.setAttribute("title", "click to sort");
    });
  }

  // The channel table's filter: tokens match a layer name, a channel, or layer:channel.
  function filtered(table, filter, count) {
    function matches(row, tokens) {
      var layer = (row.getAttribute("data-layer") || "").toLowerCase();
      var channel = row.getAttribute("data-channel");
      return tokens.every(function (t) {
        var pair = t.split(":");
        if (pair.length === 2 && pair[1] !== "") {
          return layer.indexOf(pair[0]) !== -1 && channel === pair[1];
        }
        return layer.indexOf(t) !== -1 || channel === t;
      });
    }
    function apply() {
      var tokens = filter.value.toLowerCase().split(/\s+/).filter(Boolean);
      var rows = table.tBodies[0].rows;
      var shown = 0;
      each(rows, function (r) {
        var ok = tokens.length === 0 || matches(r, tokens);
        r.style.display = ok ? "" : "none";
        if (ok) { shown += 1; }
      });
      if (count) { count.textContent = shown + " of " + rows.length + " channels shown"; }
      table.setAttribute("data-shown", String(shown));
    }
    filter.addEventListener("input", apply);
    apply();
  }

  each(document.querySelectorAll("table.sortable"), sortable);
  var channels = document.getElementById("channel-table");
  var filter = document.getElementById("channel-filter");
  if (channels && filter && channels.tBodies.length) {
    filtered(channels, filter, document.getElementById("channel-count"));
  }
  document.body.setAttribute("data-ready", "1");
})();
