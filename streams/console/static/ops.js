/* Operations dashboard: loads /api/ops once, then follows /api/ops/stream. */
"use strict";

const $ = (id) => document.getElementById(id);
const WINDOW_MS = 5 * 60 * 1000;
const MAX_POINTS = 300;

const ops = {
  history: [],          // points, oldest first
  seen: new Set(),      // their ts values
  last: null,           // the latest /api/ops object
  openPayloads: new Set(), // dead letters whose payload is shown
  deadSignature: null, // null until the first render, so an empty list still shows its note
};

function mergeHistory(points) {
  let added = false;
  for (const point of points || []) {
    if (!point || !isNum(point.ts) || ops.seen.has(point.ts)) continue;
    ops.history.push(point);
    ops.seen.add(point.ts);
    added = true;
  }
  if (!added) return;
  ops.history.sort((a, b) => a.ts - b.ts);
  while (ops.history.length > MAX_POINTS) ops.seen.delete(ops.history.shift().ts);
}

/* ---------- tiles ---------- */

function setTile(id, value, format) {
  const node = $(id);
  node.textContent = format(value);
  if (isNum(value)) node.dataset.value = String(value);
  else node.removeAttribute("data-value");
}

const rate = (v) => fmtNum(v, isNum(v) && Math.abs(v) < 100 ? 1 : 0);

function renderTiles(data, cur) {
  const p = cur || {};
  const lat = p.latency_ms || {};
  setTile("throughput", p.events_per_s, rate);
  setTile("rec-rate", p.recommendations_per_s, rate);
  setTile("latency-p50", lat.p50, fmtMs);
  setTile("latency-p95", lat.p95, fmtMs);
  setTile("latency-p99", lat.p99, fmtMs);
  setTile("lag", p.lag_total, (v) => fmtNum(v, 0));
  setTile("encoder-rate", p.encoder_texts_per_s, rate);
  setTile("dead-letter-total", p.dead_letters_total, (v) => fmtNum(v, 0));
  $("dead-letter-tile").classList.toggle("alert", isNum(p.dead_letters_total) && p.dead_letters_total > 0);
  $("events-total").textContent = isNum(p.events_total) ? `${fmtNum(p.events_total, 0)} events in total` : "";
  $("recs-total").textContent = isNum(p.recommendations_total) ? `${fmtNum(p.recommendations_total, 0)} lists in total` : "";

  const topics = Object.entries(p.lag || {}).sort((a, b) => a[0].localeCompare(b[0]));
  $("lag-topics").innerHTML = topics.map(([topic, n]) =>
    `<li><span>${escapeHTML(topic)}</span><span>${fmtNum(n, 0)}</span></li>`).join("");

  const models = (data.models || []).map((m) => `${m.model} ${m.version}`);
  $("model-version").textContent = models.length ? models.join(", ") : "–";

  const workers = data.workers || [];
  $("workers").innerHTML = workers.length ? workers.map((w) =>
    `<li><span class="status ${w.up ? "up" : "down"}">${w.up ? "up" : "down"}</span>` +
    `<code>${escapeHTML(w.url)}</code>` +
    (w.error ? `<span class="err">${escapeHTML(w.error)}</span>` : "") + "</li>").join("")
    : '<li class="muted">No workers registered.</li>';
}

/* ---------- charts ---------- */

function renderCharts(data) {
  const h = ops.history;
  const xMax = isNum(data.now) ? data.now : h.length ? h[h.length - 1].ts : Date.now();
  // The last five minutes, or less while the console has not been watching that long.
  const first = h.length ? h[0].ts : xMax;
  const range = { xMin: Math.max(xMax - WINDOW_MS, Math.min(first, xMax - 30_000)), xMax };
  const pts = (fn) => h.map((p) => [p.ts, fn(p)]);
  const num = (v) => (isNum(v) ? v : null);

  lineChart($("chart-throughput"), [
    { name: "events/s", color: colorAt(0), points: pts((p) => num(p.events_per_s)) },
    { name: "recommendations/s", color: colorAt(1), points: pts((p) => num(p.recommendations_per_s)) },
  ], range);

  lineChart($("chart-latency"), [
    { name: "p50", color: colorAt(1), points: pts((p) => num((p.latency_ms || {}).p50)) },
    { name: "p95", color: colorAt(2), points: pts((p) => num((p.latency_ms || {}).p95)) },
    { name: "p99", color: colorAt(3), points: pts((p) => num((p.latency_ms || {}).p99)) },
  ], { ...range, formatY: (v) => fmtNum(v) });

  const topics = [...new Set(h.flatMap((p) => Object.keys(p.lag || {})))].sort();
  // The total goes last so that its line is drawn on top of the per-topic lines.
  lineChart($("chart-lag"), [
    ...topics.map((topic, i) => ({ name: topic.replace(/^recstream\./, "").replace(/\.v\d+$/, ""), color: colorAt(i >= 8 ? i + 1 : i), points: pts((p) => num((p.lag || {})[topic])) })),
    { name: "total", color: colorAt(8), points: pts((p) => num(p.lag_total)) },
  ], range);

  lineChart($("chart-encoder"), [
    { name: "texts/s", color: colorAt(4), points: pts((p) => num(p.encoder_texts_per_s)) },
  ], range);
}

/* ---------- dead letters ---------- */

function renderDeadLetters(data) {
  const dl = data.dead_letters || {};
  const reasons = dl.by_reason || [];
  $("dead-letter-reasons").innerHTML = reasons.length ? reasons.map((r) =>
    `<tr data-testid="dead-letter-reason"><td>${escapeHTML(r.stage)}</td><td>${escapeHTML(r.reason)}</td>` +
    `<td class="num">${fmtNum(r.count, 0)}</td></tr>`).join("")
    : '<tr><td colspan="3" class="empty">No dead letters.</td></tr>';

  // Re-render the list only when it changes, so open payloads stay open.
  const recent = dl.recent || [];
  const signature = recent.map((d) => `${d.event_id}|${d.ts}|${d.offset}`).join(",");
  if (signature === ops.deadSignature) return;
  ops.deadSignature = signature;
  $("dead-letters").innerHTML = recent.length ? recent.map((d, i) => {
    const key = String(d.event_id || `${d.topic}:${d.partition}:${d.offset}:${i}`);
    const open = ops.openPayloads.has(key);
    const where = `${d.topic ?? "?"} / ${d.partition ?? "?"} / ${d.offset ?? "?"}`;
    return `<li class="dead-letter" data-testid="dead-letter" data-key="${escapeHTML(key)}">
  <div class="dl-head">
    <span class="muted" title="${escapeHTML(isNum(d.ts) ? new Date(d.ts).toISOString() : "")}">${escapeHTML(isNum(d.ts) ? fmtDateTime(d.ts) : "–")}</span>
    <span class="tag">${escapeHTML(d.stage || "?")}</span>
    <code title="topic / partition / offset">${escapeHTML(where)}</code>
    ${d.event_id ? `<span class="muted small">event ${escapeHTML(d.event_id)}</span>` : ""}
  </div>
  <div class="dl-error"><b>${escapeHTML(d.error_type || "error")}</b>: ${escapeHTML(d.error || "")}</div>
  <button type="button" data-action="show-payload" aria-expanded="${open}">${open ? "Hide payload" : "Show payload"}</button>
  <div class="payload-box"${open ? "" : " hidden"}>
    <pre data-testid="payload">${escapeHTML(d.payload_text || "")}</pre>
    <div class="muted small">original bytes: ${isNum(d.payload_bytes) ? fmtNum(d.payload_bytes, 0) : "?"}${d.payload_truncated ? " (shown in part; all of them at <a href=\"/api/dead-letters\">/api/dead-letters</a>)" : ""}</div>
  </div>
</li>`;
  }).join("") : '<li class="empty">No dead letters: every message was processed.</li>';
}

function onDeadLetterClick(event) {
  const button = event.target.closest('[data-action="show-payload"]');
  if (!button) return;
  const item = button.closest('[data-testid="dead-letter"]');
  const box = item.querySelector(".payload-box");
  box.hidden = !box.hidden;
  button.textContent = box.hidden ? "Show payload" : "Hide payload";
  button.setAttribute("aria-expanded", String(!box.hidden));
  if (box.hidden) ops.openPayloads.delete(item.dataset.key);
  else ops.openPayloads.add(item.dataset.key);
}

/* ---------- wiring ---------- */

function render(data) {
  ops.last = data;
  const h = ops.history;
  const cur = data.current !== undefined ? data.current : h.length ? h[h.length - 1] : null;
  renderTiles(data, cur);
  renderCharts(data);
  renderDeadLetters(data);
  $("updated").textContent = `updated ${fmtTime(isNum(data.now) ? data.now : Date.now())}`;
}

function onUpdate(data) {
  if (!data) return;
  mergeHistory(data.history);
  render(data);
}

async function init() {
  $("dead-letters").addEventListener("click", onDeadLetterClick);
  try {
    onUpdate(await fetchJSON("/api/ops"));
  } catch (error) {
    $("error").textContent = `Could not load /api/ops: ${error.message}`;
    renderCharts({});
  }
  openStream("/api/ops/stream", {
    ops: (data) => { $("error").textContent = ""; onUpdate(data); },
  }, (s) => setConnection($("conn"), s));

  let resizeTimer = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => renderCharts(ops.last || {}), 150);
  });
}

init();
