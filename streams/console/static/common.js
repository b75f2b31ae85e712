/* Shared helpers for the recstream console pages (plain scripts, no modules). */
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";

/** Fetch a URL and parse JSON; throws an Error carrying the server's one-line message. */
async function fetchJSON(url, options = {}) {
  const init = { headers: { Accept: "application/json" }, ...options };
  if (init.body !== undefined && typeof init.body !== "string") {
    init.body = JSON.stringify(init.body);
    init.headers = { ...init.headers, "Content-Type": "application/json" };
  }
  const response = await fetch(url, init);
  let data = null;
  const text = await response.text();
  if (text) {
    try { data = JSON.parse(text); } catch (_) { data = { error: text.slice(0, 200) }; }
  }
  if (!response.ok) {
    const message = (data && data.error) || `${response.status} ${response.statusText}`;
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return data;
}

/** Escape text for use inside HTML markup and attribute values. */
function escapeHTML(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) => ({
    "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;",
  })[c]);
}

const isNum = (v) => typeof v === "number" && Number.isFinite(v);

/** Compact number: 1234 -> "1,234", 3.14159 -> "3.14", null -> "–". */
function fmtNum(value, digits) {
  if (!isNum(value)) return "–";
  if (digits === undefined) {
    const abs = Math.abs(value);
    digits = Number.isInteger(value) ? 0 : abs >= 100 ? 0 : abs >= 10 ? 1 : 2;
  }
  return value.toLocaleString(undefined, { minimumFractionDigits: digits, maximumFractionDigits: digits });
}

/** Milliseconds: 0.42 -> "0.42 ms", 85 -> "85 ms", 2500 -> "2.50 s". */
function fmtMs(value) {
  if (!isNum(value)) return "–";
  if (Math.abs(value) >= 1000) return `${fmtNum(value / 1000, 2)} s`;
  return `${fmtNum(value, value < 10 ? 2 : value < 100 ? 1 : 0)} ms`;
}

/** Clock time of an epoch-ms timestamp, e.g. "14:03:27". */
function fmtTime(ms) {
  if (!isNum(ms)) return "–";
  return new Date(ms).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
}

/** Date and time of an epoch-ms timestamp or ISO string. */
function fmtDateTime(value) {
  const date = new Date(value);
  if (Number.isNaN(date.getTime())) return String(value ?? "–");
  return date.toLocaleString([], { year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", hour12: false });
}

/** Fill the page header (an element with data-page) with the brand and nav links. */
function renderNav() {
  const header = document.querySelector("header[data-page]");
  if (!header) return;
  const current = header.dataset.page;
  const pages = [["store", "/", "Store"], ["ops", "/ops", "Operations"], ["eval", "/eval", "Evaluation"]];
  const links = pages.map(([key, href, label]) =>
    `<a href="${href}"${key === current ? ' class="active" aria-current="page"' : ""}>${label}</a>`).join("");
  header.innerHTML =
    `<div class="header-inner"><a class="brand" href="/"><span class="brand-mark" aria-hidden="true"></span>recstream</a>` +
    `<nav class="nav">${links}</nav><span class="header-extra" id="header-extra"></span></div>`;
}

/** Set a connection indicator element: state is "live", "connecting" or "down". */
function setConnection(element, state, text) {
  if (!element) return;
  element.dataset.state = state;
  element.textContent = text || { live: "live", connecting: "connecting…", down: "disconnected" }[state] || state;
}

/**
 * An EventSource that keeps reconnecting: the browser retries by itself after network errors,
 * but gives up (readyState CLOSED) on an HTTP error, so then we retry after a pause.
 * handlers: {[eventName]: fn(data)}, onState: fn("live"|"connecting"|"down").
 */
function openStream(url, handlers, onState) {
  let source = null;
  let timer = null;
  let closed = false;
  const connect = () => {
    if (closed) return;
    onState && onState("connecting");
    source = new EventSource(url);
    source.onopen = () => onState && onState("live");
    source.onerror = () => {
      if (closed) return;
      if (source.readyState === EventSource.CLOSED) {
        onState && onState("down");
        timer = setTimeout(connect, 3000);
      } else {
        onState && onState("connecting");
      }
    };
    for (const [name, fn] of Object.entries(handlers)) {
      source.addEventListener(name, (event) => {
        let data;
        try { data = JSON.parse(event.data); } catch (_) { return; }
        fn(data);
      });
    }
  };
  connect();
  return {
    close() {
      closed = true;
      clearTimeout(timer);
      if (source) source.close();
    },
  };
}

/* ---------- SVG line chart ---------- */

function svgEl(name, attrs = {}, text) {
  const node = document.createElementNS(SVG_NS, name);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

/** About `count` round tick values covering [0, max]. */
function niceTicks(max, count = 4) {
  if (!(max > 0)) return [0, 1];
  const raw = max / count;
  const power = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * power).find((s) => s >= raw) || raw;
  const ticks = [];
  for (let v = 0; v <= max + step * 1e-9; v += step) ticks.push(Number(v.toPrecision(12)));
  return ticks;
}

/** A round time step (ms) giving about 5 ticks over `span` ms. */
function timeStep(span) {
  const steps = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400].map((s) => s * 1000);
  return steps.find((s) => span / s <= 6) || steps[steps.length - 1];
}

/**
 * Draw (or redraw in place) a line chart into an <svg>.
 * series: [{name, color, points: [[t_ms, value|null], ...]}]; a null value breaks the line.
 * opts: {xMin, xMax (ms; default: the data's range), height (px, default 200),
 *        formatY (tick label fn), formatX (tick label fn), empty (text when no data)}.
 * The y axis runs from 0 to 1.1 × the largest value.
 */
function lineChart(svg, series, opts = {}) {
  const width = Math.max(240, Math.round(svg.clientWidth || svg.getBoundingClientRect().width || 600));
  // Legend entries flow along the top and wrap onto further rows when the chart is narrow.
  const entries = [];
  let lx = 46, row = 0;
  for (const s of series) {
    const last = [...(s.points || [])].reverse().find((p) => isNum(p[1]));
    const label = `${s.name}${last ? ` ${(opts.formatY || fmtNum)(last[1])}` : ""}`;
    const w = 14 + label.length * 6.4 + 14;
    if (lx + w > width - 12 && lx > 46) { lx = 46; row += 1; }
    entries.push({ s, label, x: lx, y: 8 + row * 16 });
    lx += w;
  }
  const height = (opts.height || 200) + row * 16;
  const pad = { top: 26 + row * 16, right: 12, bottom: 22, left: 46 };
  const plotW = width - pad.left - pad.right;
  const plotH = height - pad.top - pad.bottom;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("height", height);
  svg.setAttribute("role", "img");
  while (svg.firstChild) svg.removeChild(svg.firstChild);

  const all = series.flatMap((s) => s.points || []);
  const times = all.map((p) => p[0]).filter(isNum);
  const values = all.map((p) => p[1]).filter(isNum);
  let xMin = isNum(opts.xMin) ? opts.xMin : Math.min(...times);
  let xMax = isNum(opts.xMax) ? opts.xMax : Math.max(...times);
  if (!isNum(xMin) || !isNum(xMax)) { xMax = Date.now(); xMin = xMax - 60000; }
  if (xMax <= xMin) xMax = xMin + 1000;
  const peak = values.length ? Math.max(0, ...values) : 0;
  const yMax = peak > 0 ? peak * 1.1 : 1;
  const x = (t) => pad.left + ((t - xMin) / (xMax - xMin)) * plotW;
  const y = (v) => pad.top + plotH - (v / yMax) * plotH;
  const formatY = opts.formatY || ((v) => fmtNum(v));
  const xStep = timeStep(xMax - xMin);
  const formatX = opts.formatX || ((t) => (xStep >= 60000 ? fmtTime(t).slice(0, 5) : fmtTime(t)));

  // Horizontal grid lines with y tick labels.
  const grid = svgEl("g", { class: "chart-grid" });
  for (const tick of niceTicks(yMax, 4)) {
    if (tick > yMax) continue;
    grid.appendChild(svgEl("line", { x1: pad.left, x2: pad.left + plotW, y1: y(tick), y2: y(tick) }));
    grid.appendChild(svgEl("text", { x: pad.left - 6, y: y(tick) + 4, "text-anchor": "end", class: "chart-label" }, formatY(tick)));
  }
  svg.appendChild(grid);

  // Time ticks on round clock times (local time zone), a few across the range.
  const axis = svgEl("g", { class: "chart-axis" });
  axis.appendChild(svgEl("line", { x1: pad.left, x2: pad.left + plotW, y1: pad.top + plotH, y2: pad.top + plotH }));
  axis.appendChild(svgEl("line", { x1: pad.left, x2: pad.left, y1: pad.top, y2: pad.top + plotH }));
  const tz = new Date(xMin).getTimezoneOffset() * 60000;
  for (let t = Math.ceil((xMin - tz) / xStep) * xStep + tz; t <= xMax; t += xStep) {
    const px = x(t);
    const anchor = px - pad.left < 16 ? "start" : pad.left + plotW - px < 16 ? "end" : "middle";
    axis.appendChild(svgEl("line", { x1: px, x2: px, y1: pad.top + plotH, y2: pad.top + plotH + 4 }));
    axis.appendChild(svgEl("text", { x: px, y: height - 6, "text-anchor": anchor, class: "chart-label" }, formatX(t)));
  }
  svg.appendChild(axis);

  // Lines: each run of consecutive non-null points is one subpath; lone points become dots.
  const clipId = `clip-${svg.id || svg.dataset.testid || Math.random().toString(36).slice(2)}`;
  const defs = svgEl("defs");
  const clip = svgEl("clipPath", { id: clipId });
  clip.appendChild(svgEl("rect", { x: pad.left, y: pad.top - 2, width: plotW, height: plotH + 4 }));
  defs.appendChild(clip);
  svg.appendChild(defs);
  const lines = svgEl("g", { "clip-path": `url(#${clipId})` });
  for (const s of series) {
    const points = (s.points || []).filter((p) => isNum(p[0])).sort((a, b) => a[0] - b[0]);
    let d = "";
    let run = [];
    const flush = () => {
      if (run.length === 1) {
        lines.appendChild(svgEl("circle", { cx: run[0][0], cy: run[0][1], r: 2, fill: s.color }));
      } else if (run.length > 1) {
        d += run.map(([px, py], i) => `${i ? "L" : "M"}${px.toFixed(1)},${py.toFixed(1)}`).join("");
      }
      run = [];
    };
    for (const [t, v] of points) {
      if (isNum(v)) run.push([x(t), y(v)]); else flush();
    }
    flush();
    if (d) lines.appendChild(svgEl("path", { d, fill: "none", stroke: s.color, "stroke-width": 1.75, "stroke-linejoin": "round", "stroke-linecap": "round" }));
  }
  svg.appendChild(lines);

  // Legend along the top, with each series' latest value.
  const legend = svgEl("g", { class: "chart-legend" });
  for (const { s, label, x: ex, y: ey } of entries) {
    legend.appendChild(svgEl("rect", { x: ex, y: ey, width: 10, height: 10, rx: 2, fill: s.color }));
    legend.appendChild(svgEl("text", { x: ex + 14, y: ey + 9, class: "chart-label legend-label" }, label));
  }
  svg.appendChild(legend);

  if (!values.length) {
    svg.appendChild(svgEl("text", { x: pad.left + plotW / 2, y: pad.top + plotH / 2, "text-anchor": "middle", class: "chart-empty" }, opts.empty || "no data yet"));
  }
}

/** A stable colour for the i-th series. */
const PALETTE = ["#2563eb", "#16a34a", "#d97706", "#dc2626", "#7c3aed", "#0891b2", "#db2777", "#65a30d", "#475569"];
const colorAt = (i) => PALETTE[i % PALETTE.length];

document.addEventListener("DOMContentLoaded", renderNav);
