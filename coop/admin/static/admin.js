// Live parts of admin pages. A page works without this script; with it, an element with
// data-live-src re-reads that JSON API URL every data-live-every seconds and refreshes its
// [data-field] texts and [data-svg] charts (SVG rendered and escaped by the server).
"use strict";
(function () {
  const root = document.querySelector("[data-live-src]");
  if (!root) return;
  const every = Math.max(1, Number(root.dataset.liveEvery) || 5) * 1000;

  function show(el, value) {
    if (value === null || value === undefined) { el.textContent = "—"; return; }
    if (el.dataset.kind === "time") { el.textContent = String(value).replace("T", " ").slice(0, 19); return; }
    if (typeof value === "number" && el.dataset.digits) { el.textContent = value.toFixed(Number(el.dataset.digits)); return; }
    el.textContent = String(value);
  }

  async function refresh() {
    try {
      const response = await fetch(root.dataset.liveSrc, { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (response.status === 401) { window.location.reload(); return; }
      if (!response.ok) return;
      const data = await response.json();
      root.querySelectorAll("[data-field]").forEach((el) => show(el, data[el.dataset.field]));
      root.querySelectorAll("[data-svg]").forEach((el) => {
        if (typeof data[el.dataset.svg] === "string" && data[el.dataset.svg]) el.innerHTML = data[el.dataset.svg];
      });
      root.dataset.refreshedAt = new Date().toISOString();
    } catch (err) {
      // keep showing the last state; the next tick tries again
    }
  }

  window.setInterval(refresh, every);
})();
