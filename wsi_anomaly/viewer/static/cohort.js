// Sort the cohort table by the clicked column; click again to reverse. Empty values sort last.
(function () {
  const table = document.getElementById("cohort");
  if (!table) { return; }
  const headers = table.tHead.rows[0].cells;
  let sorted = {column: -1, ascending: true};
  Array.from(headers).forEach(function (th, column) {
    if (column === 0) { return; }
    th.classList.add("sort");
    th.addEventListener("click", function () {
      const ascending = sorted.column === column ? !sorted.ascending : th.dataset.type === "text";
      sorted = {column: column, ascending: ascending};
      const numeric = th.dataset.type === "number";
      const body = table.tBodies[0];
      const rows = Array.from(body.rows);
      const key = function (row) {
        const raw = row.cells[column].dataset.value || "";
        if (raw === "") { return null; }
        return numeric ? parseFloat(raw) : raw.toLowerCase();
      };
      rows.sort(function (a, b) {
        const ka = key(a), kb = key(b);
        if (ka === null && kb === null) { return 0; }
        if (ka === null) { return 1; }
        if (kb === null) { return -1; }
        const order = ka < kb ? -1 : ka > kb ? 1 : 0;
        return ascending ? order : -order;
      });
      rows.forEach(function (row) { body.appendChild(row); });
      Array.from(headers).forEach(function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    });
  });
})();
