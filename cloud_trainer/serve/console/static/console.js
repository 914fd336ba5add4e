// knet console: live fleet rows over server-sent events, a client-side filter and sort.
// No framework and nothing fetched from elsewhere: the server renders every row.
"use strict";
(function () {
  const body = document.querySelector("[data-live]");
  if (body && window.EventSource) {
    const es = new EventSource(body.dataset.live);
    es.addEventListener("fleet", (ev) => { body.innerHTML = ev.data; applyFilter(); });
    es.onerror = () => document.body.classList.add("stale");
    es.onopen = () => document.body.classList.remove("stale");
  }
  const filter = document.getElementById("filter");
  function applyFilter() {
    if (!filter || !body) return;
    const q = filter.value.toLowerCase();
    for (const tr of body.rows) tr.hidden = q && !tr.textContent.toLowerCase().includes(q);
  }
  if (filter) filter.addEventListener("input", applyFilter);
  for (const th of document.querySelectorAll("table.sortable th[data-k]")) {
    th.addEventListener("click", () => {
      const k = Number(th.dataset.k), rows = Array.from(body.rows);
      const dir = th.dataset.dir === "asc" ? -1 : 1; th.dataset.dir = dir > 0 ? "asc" : "desc";
      const val = (tr) => { const t = tr.cells[k] ? tr.cells[k].textContent.trim() : "";
        const n = parseFloat(t.replace(/,/g, "")); return isNaN(n) ? t : n; };
      rows.sort((a, b) => (val(a) > val(b) ? dir : val(a) < val(b) ? -dir : 0));
      for (const tr of rows) body.appendChild(tr);
    });
  }
})();
