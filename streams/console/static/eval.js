/* Evaluation page: one run in detail, plus a comparison across runs. */
"use strict";

const $ = (id) => document.getElementById(id);
const NOT_METRICS = new Set(["targets", "seconds"]);
// Preferred order of metric families within one k; unknown ones follow alphabetically.
const FAMILY_ORDER = ["HR", "NDCG", "MRR", "MAP", "Recall", "Precision", "coverage", "diversity", "novelty"];

const evalState = { data: null, runs: [], selected: null };

function splitMetric(name) {
  const m = /^(.*)@(\d+)$/.exec(name);
  return m ? { family: m[1], k: Number(m[2]) } : { family: name, k: Infinity };
}

/** Union of metric names across rows, grouped by k, then HR, NDCG, then the rest. */
function metricColumns(rows) {
  const names = new Set();
  for (const row of rows) for (const key of Object.keys(row || {})) if (!NOT_METRICS.has(key)) names.add(key);
  const rank = (family) => {
    const i = FAMILY_ORDER.findIndex((f) => f.toLowerCase() === family.toLowerCase());
    return i < 0 ? FAMILY_ORDER.length : i;
  };
  return [...names].sort((a, b) => {
    const x = splitMetric(a);
    const y = splitMetric(b);
    return (x.k - y.k) || (rank(x.family) - rank(y.family)) || x.family.localeCompare(y.family) || a.localeCompare(b);
  });
}

const fmt4 = (v) => (isNum(v) ? v.toFixed(4) : "–");
const fmtSeconds = (v) => (isNum(v) ? fmtNum(v, v < 10 ? 2 : 1) : "–");
const fmtCount = (v) => (isNum(v) ? fmtNum(v, 0) : "–");

/** The best (largest) value of each column among the given rows. */
function bestValues(rows, columns) {
  const best = {};
  for (const c of columns) {
    const values = rows.map((r) => (r || {})[c]).filter(isNum);
    if (values.length) best[c] = Math.max(...values);
  }
  return best;
}

function metricCells(row, columns, best) {
  return columns.map((c) => {
    const v = (row || {})[c];
    const text = fmt4(v);
    return `<td class="num">${isNum(v) && v === best[c] ? `<b>${text}</b>` : text}</td>`;
  }).join("");
}

function emptyText() {
  const dir = (evalState.data && evalState.data.eval_dir) || "the eval directory";
  return `No evaluation results in ${escapeHTML(dir)} yet: run <code>\`recstream eval LOG --out ${escapeHTML(dir)}/NAME\`</code>`;
}

/* ---------- one run ---------- */

function modelsTable(run) {
  const models = Object.entries(run.models || {});
  if (!models.length) return '<p class="empty">This run has no model results.</p>';
  const columns = metricColumns(models.map(([, m]) => m));
  const best = bestValues(models.map(([, m]) => m), columns);
  const head = `<tr><th>Model</th>${columns.map((c) => `<th class="num">${escapeHTML(c)}</th>`).join("")}` +
    '<th class="num">Targets</th><th class="num">Seconds</th></tr>';
  const body = models.map(([name, m]) =>
    `<tr data-model="${escapeHTML(name)}"><td class="model-name">${escapeHTML(name)}</td>${metricCells(m, columns, best)}` +
    `<td class="num">${fmtCount(m.targets)}</td><td class="num">${fmtSeconds(m.seconds)}</td></tr>`).join("");
  return `<div class="table-wrap"><table data-testid="eval-table"><thead>${head}</thead><tbody>${body}</tbody></table></div>`;
}

/** Slices grouped by slice name, one row per model; the best model per slice and metric in bold. */
function slicesTable(run) {
  const bySlice = new Map();
  for (const [model, slices] of Object.entries(run.slices || {})) {
    for (const [slice, values] of Object.entries(slices || {})) {
      if (!bySlice.has(slice)) bySlice.set(slice, []);
      bySlice.get(slice).push([model, values]);
    }
  }
  const allRows = [...bySlice.values()].flat().map(([, v]) => v);
  const columns = metricColumns(allRows);
  const head = `<tr><th>Slice</th><th>Model</th>${columns.map((c) => `<th class="num">${escapeHTML(c)}</th>`).join("")}` +
    '<th class="num">Targets</th></tr>';
  let body = "";
  for (const [slice, rows] of bySlice) {
    const best = rows.length > 1 ? bestValues(rows.map(([, v]) => v), columns) : {};
    rows.forEach(([model, v], i) => {
      body += `<tr class="${i === 0 ? "group-start" : ""}" data-slice="${escapeHTML(slice)}" data-slice-model="${escapeHTML(model)}">` +
        `<td>${i === 0 ? escapeHTML(slice) : ""}</td><td>${escapeHTML(model)}</td>${metricCells(v, columns, best)}` +
        `<td class="num">${fmtCount(v && v.targets)}</td></tr>`;
    });
  }
  if (!body) body = `<tr><td colspan="${columns.length + 3}" class="empty">This run has no slices.</td></tr>`;
  return `<div class="table-wrap"><table data-testid="eval-slices"><thead>${head}</thead><tbody>${body}</tbody></table></div>`;
}

function renderRun(run) {
  const section = $("run");
  if (!run) {
    section.innerHTML = `<p class="empty">${emptyText()}</p>`;
    return;
  }
  const plots = (run.plots || []).map((src) => {
    const name = String(src).split("/").pop();
    return `<figure><a href="${escapeHTML(src)}" target="_blank" rel="noopener">` +
      `<img data-testid="eval-plot" src="${escapeHTML(src)}" alt="${escapeHTML(name)}" loading="lazy"></a>` +
      `<figcaption>${escapeHTML(name)}</figcaption></figure>`;
  }).join("");
  const ks = (run.ks || []).length ? ` · k = ${run.ks.map(escapeHTML).join(", ")}` : "";
  section.innerHTML = `
    <div class="run-head">
      <h2>${escapeHTML(run.dataset || "?")} · ${escapeHTML(run.protocol || "?")}</h2>
      <span class="muted small">run <code>${escapeHTML(run.id)}</code> · modified ${escapeHTML(fmtDateTime(run.modified))}${ks}</span>
    </div>
    ${run.command ? `<code class="run-command">${escapeHTML(run.command)}</code>` : '<p class="muted small">The command was not recorded.</p>'}
    <h3 style="margin:18px 0 8px">Models</h3>
    ${modelsTable(run)}
    <h3 style="margin:18px 0 8px">Slices</h3>
    ${slicesTable(run)}
    <h3 style="margin:18px 0 8px">Plots</h3>
    ${plots ? `<div class="plots">${plots}</div>` : '<p class="muted small">No plots for this run.</p>'}
    ${run.markdown ? `<p style="margin:14px 0 0"><a href="${escapeHTML(run.markdown)}" target="_blank" rel="noopener">Full results (${escapeHTML(String(run.markdown).split("/").pop())})</a></p>` : ""}`;
}

/* ---------- comparison ---------- */

/** The run's first k: ks[0], else the smallest k among its HR@k metrics. */
function firstK(run) {
  if ((run.ks || []).length && isNum(Number(run.ks[0]))) return Number(run.ks[0]);
  const ks = Object.values(run.models || {}).flatMap((m) => Object.keys(m || {}))
    .map(splitMetric).filter((s) => s.family === "HR" && isFinite(s.k)).map((s) => s.k);
  return ks.length ? Math.min(...ks) : null;
}

function renderCompare() {
  const body = $("compare-body");
  const runs = evalState.runs;
  if (!runs.length) {
    body.innerHTML = `<p class="empty">${emptyText()}</p>`;
    return;
  }
  const kOf = new Map(runs.map((r) => [r.id, firstK(r)]));
  const distinct = new Set(kOf.values());
  const shared = distinct.size === 1 ? [...distinct][0] : null;
  const kLabel = shared === null ? "k" : String(shared);
  const rows = runs.flatMap((run) => Object.entries(run.models || {}).map(([model, m]) => {
    const k = kOf.get(run.id);
    const cell = (family) => {
      const v = k === null ? undefined : m[`${family}@${k}`];
      return `<td class="num">${fmt4(v)}${shared === null && k !== null ? ` <span class="muted small">@${k}</span>` : ""}</td>`;
    };
    const selected = evalState.selected && evalState.selected.id === run.id;
    return `<tr class="${selected ? "selected" : ""}" data-run="${escapeHTML(run.id)}" data-run-model="${escapeHTML(model)}">` +
      `<td><a href="#run=${encodeURIComponent(run.id)}">${escapeHTML(run.id)}</a></td>` +
      `<td>${escapeHTML(run.dataset || "")}</td><td>${escapeHTML(run.protocol || "")}</td><td>${escapeHTML(model)}</td>` +
      `${cell("HR")}${cell("NDCG")}</tr>`;
  })).join("");
  body.innerHTML = `<div class="table-wrap"><table>
    <thead><tr><th>Run</th><th>Dataset</th><th>Protocol</th><th>Model</th>` +
    `<th class="num">HR@${kLabel}</th><th class="num">NDCG@${kLabel}</th></tr></thead>
    <tbody>${rows || '<tr><td colspan="6" class="empty">The runs have no model results.</td></tr>'}</tbody></table></div>`;
}

/* ---------- wiring ---------- */

function runFromHash() {
  const m = /^#run=(.+)$/.exec(location.hash);
  const id = m ? decodeURIComponent(m[1]) : null;
  return evalState.runs.find((r) => r.id === id) || evalState.runs[0] || null;
}

function select(run) {
  evalState.selected = run;
  if (run) $("eval-run").value = run.id;
  renderRun(run);
  renderCompare();
}

async function init() {
  try {
    evalState.data = await fetchJSON("/api/eval");
  } catch (error) {
    $("error").textContent = `Could not load /api/eval: ${error.message}`;
    $("run").innerHTML = '<p class="empty">No results to show.</p>';
    return;
  }
  evalState.runs = evalState.data.runs || [];
  if (evalState.data.eval_dir) {
    $("eval-dir").innerHTML = `Offline results written by <code>recstream eval</code> under <code>${escapeHTML(evalState.data.eval_dir)}</code>.`;
  }
  const picker = $("eval-run");
  picker.innerHTML = evalState.runs.length
    ? evalState.runs.map((r) => `<option value="${escapeHTML(r.id)}">${escapeHTML(
      [r.id, r.dataset, r.protocol, fmtDateTime(r.modified)].join(" · "))}</option>`).join("")
    : "<option value=\"\">no runs yet</option>";
  picker.disabled = !evalState.runs.length;
  picker.addEventListener("change", () => {
    const run = evalState.runs.find((r) => r.id === picker.value) || null;
    history.replaceState(null, "", run && run !== evalState.runs[0] ? `#run=${encodeURIComponent(run.id)}` : location.pathname);
    select(run);
  });
  window.addEventListener("hashchange", () => select(runFromHash()));
  select(runFromHash());
}

init();
