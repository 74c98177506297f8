/* The billing page's chart: daily spend by product, drawn from the data the server
   put in the canvas's data-chart attribute (amounts already formatted there: the
   browser computes no money). Drawn on load and again whenever htmx swaps in a new
   copy of the open invoice. */
(function () {
  "use strict";
  var COLORS = ["#3538cd", "#0e9384", "#dc6803", "#c11574", "#667085", "#1570ef", "#4e5ba6", "#b54708"];

  function shortDay(iso) {
    var parts = iso.split("-");
    return String(Number(parts[2])) + "/" + String(Number(parts[1]));
  }

  function draw(canvas) {
    if (canvas.dataset.drawn || typeof Chart === "undefined") return;
    canvas.dataset.drawn = "1";
    var data = JSON.parse(canvas.dataset.chart);
    new Chart(canvas, {
      type: "bar",
      data: {
        labels: data.days.map(shortDay),
        datasets: data.series.map(function (series, index) {
          return {
            label: series.product,
            data: series.cents.map(function (cents) { return cents / 100; }),
            backgroundColor: COLORS[index % COLORS.length],
            stack: "spend"
          };
        })
      },
      options: {
        animation: false,
        responsive: true,
        maintainAspectRatio: false,
        interaction: { mode: "index", intersect: false },
        scales: {
          x: { stacked: true },
          y: { stacked: true, beginAtZero: true, title: { display: true, text: data.axis } }
        },
        plugins: {
          legend: { position: "bottom", labels: { boxWidth: 12 } },
          tooltip: {
            callbacks: {
              title: function (items) { return data.days[items[0].dataIndex]; },
              label: function (item) {
                var series = data.series[item.datasetIndex];
                return series.product + ": " + series.text[item.dataIndex];
              },
              footer: function (items) { return "Day total: " + data.totals[items[0].dataIndex]; }
            }
          }
        }
      }
    });
  }

  function drawAll(root) {
    var canvases = (root || document).querySelectorAll("canvas[data-chart]");
    Array.prototype.forEach.call(canvases, draw);
  }

  /* What the customer opened stays open when a new copy of the invoice comes in. */
  var keptOpen = [];
  document.addEventListener("htmx:beforeSwap", function (event) {
    var opened = event.detail.target.querySelectorAll("details[data-keep-open][open]");
    keptOpen = Array.prototype.map.call(opened, function (details) { return details.dataset.keepOpen; });
  });
  document.addEventListener("htmx:afterSwap", function () {
    keptOpen.forEach(function (key) {
      var details = document.querySelector('details[data-keep-open="' + key + '"]');
      if (details) details.open = true;
    });
    keptOpen = [];
  });

  document.addEventListener("DOMContentLoaded", function () { drawAll(document); });
  document.addEventListener("htmx:load", function (event) { drawAll(event.target); });
})();
