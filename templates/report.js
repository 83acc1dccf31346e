// Class toggles: a body class hides that class's boxes everywhere. Set from each checkbox at load
// too, since uncertain detections start hidden and a browser may restore a box's earlier state.
document.querySelectorAll("input[data-toggle]").forEach(function (box) {
  function apply() { document.body.classList.toggle("hide-" + box.dataset.toggle, !box.checked); }
  box.addEventListener("change", apply);
  apply();
});
// Sortable tables: numbers compare as numbers, the rest as text.
document.querySelectorAll("th.sortable").forEach(function (th) {
  th.addEventListener("click", function () {
    var table = th.closest("table"), body = table.tBodies[0], idx = Array.prototype.indexOf.call(th.parentNode.children, th);
    var asc = th.dataset.dir !== "asc";
    th.dataset.dir = asc ? "asc" : "desc";
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[idx].dataset.v !== undefined ? a.cells[idx].dataset.v : a.cells[idx].textContent;
      var y = b.cells[idx].dataset.v !== undefined ? b.cells[idx].dataset.v : b.cells[idx].textContent;
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : String(x).localeCompare(String(y));
      return asc ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
