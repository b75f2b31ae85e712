/* Storefront: catalogue grid, event sending and the live "Recommended for you" panel. */
"use strict";

const $ = (id) => document.getElementById(id);
const KIND_LABEL = { view: "view", click: "click", add_to_cart: "add to cart", purchase: "purchase", review: "review" };

const state = {
  user: "",
  stream: null,
  items: [],
  byId: new Map(),
  group: "",          // active chip ("" = all)
  query: "",
  sent: new Map(),    // event_id -> {sentAt (performance.now()), kind, itemId}
  arrivals: new Map(), // trigger_event_id -> performance.now() when its first list arrived
  measuredAt: -1,     // sentAt of the event behind the value shown in click-to-list
  prevRecIds: null,   // item ids of the previous list (null before the first list)
};

/* ---------- user ---------- */

function initialUser() {
  const fromQuery = new URLSearchParams(location.search).get("user");
  if (fromQuery && fromQuery.trim()) return fromQuery.trim();
  try {
    const saved = localStorage.getItem("recstream.user");
    if (saved && saved.trim()) return saved.trim();
  } catch (_) { /* storage may be disabled */ }
  const hex = Array.from(crypto.getRandomValues(new Uint8Array(2)), (b) => b.toString(16).padStart(2, "0")).join("");
  return `guest-${hex}`;
}

function setUser(user) {
  user = user.trim();
  if (!user || user === state.user) return;
  state.user = user;
  try { localStorage.setItem("recstream.user", user); } catch (_) { /* ignore */ }
  const params = new URLSearchParams(location.search);
  if (params.has("user")) {
    params.set("user", user);
    history.replaceState(null, "", `${location.pathname}?${params}`);
  }
  resetPanel();
  connect();
}

/* ---------- recommendations stream ---------- */

function connect() {
  if (state.stream) state.stream.close();
  const user = state.user;
  const url = `/api/users/${encodeURIComponent(user)}/recommendations/stream`;
  state.stream = openStream(url, {
    recommendation: (data) => { if (user === state.user) onList(data); },
  }, (s) => setConnection($("conn"), s));
}

function resetPanel() {
  state.sent.clear();
  state.arrivals.clear();
  state.measuredAt = -1;
  state.prevRecIds = null;
  $("recs").innerHTML = "";
  $("rec-status").textContent = "waiting for a first list";
  $("rec-meta").textContent = "";
  const ctl = $("click-to-list");
  ctl.textContent = "";
  ctl.removeAttribute("data-ms");
  $("sent").innerHTML = "";
  $("sent-empty").hidden = false;
}

function onList(data) {
  if (data.user_id && data.user_id !== state.user) return;
  const now = performance.now();
  const trigger = data.trigger_event_id || "";
  if (trigger && !state.arrivals.has(trigger)) state.arrivals.set(trigger, now);
  // Bound the map: lists only ever name recent events.
  if (state.arrivals.size > 500) state.arrivals.delete(state.arrivals.keys().next().value);

  const latency = isNum(data.latency_ms) ? `${fmtNum(data.latency_ms, data.latency_ms < 10 ? 1 : 0)} ms in the worker` : "";
  const parts = [`model ${data.model_version || "?"}`];
  parts.push(trigger ? `list after event ${trigger.slice(0, 8)}` : "list without a triggering event");
  if (latency) parts.push(latency);
  $("rec-status").textContent = parts.join(" · ");
  const source = { stream: "live update", latest: "latest known list", computed: "computed on connect" }[data.source] || data.source || "";
  $("rec-meta").textContent = [source, isNum(data.ts) ? `at ${fmtTime(data.ts)}` : ""].filter(Boolean).join(" · ");

  renderRecs(data.items || []);
  if (trigger) measure(trigger);
}

/** Show browser time from the POST of `eventId` to the first list reflecting it, once both are known. */
function measure(eventId) {
  const sent = state.sent.get(eventId);
  const arrivedAt = state.arrivals.get(eventId);
  if (!sent || arrivedAt === undefined || sent.measured) return;
  sent.measured = true;
  if (sent.sentAt < state.measuredAt) return; // a newer event is already shown
  state.measuredAt = sent.sentAt;
  const ms = Math.max(0, Math.round(arrivedAt - sent.sentAt));
  const ctl = $("click-to-list");
  ctl.dataset.ms = String(ms);
  ctl.textContent = `updated ${ms} ms after your ${KIND_LABEL[sent.kind] || sent.kind}`;
}

function renderRecs(items) {
  const prev = state.prevRecIds;
  const list = [...items].sort((a, b) => (a.rank ?? 0) - (b.rank ?? 0));
  $("recs").innerHTML = list.map((item, i) => {
    const title = item.title || (state.byId.get(item.item_id) || {}).title || item.item_id;
    const isNew = prev !== null && !prev.has(item.item_id);
    const reasons = (item.reasons || []).map((r, j) =>
      `<div class="reason${j ? " minor" : ""}" data-testid="reason">${escapeHTML(r)}</div>`).join("");
    const score = isNum(item.score) ? ` title="score ${item.score.toFixed(4)}"` : "";
    return `<li class="rec${isNew ? " new" : ""}" data-testid="rec" data-item-id="${escapeHTML(item.item_id)}"${score} tabindex="0">` +
      `<span class="rec-rank">${escapeHTML(item.rank ?? i + 1)}</span>` +
      `<span class="rec-title">${escapeHTML(title)}${isNew ? '<span class="badge">new</span>' : ""}</span>` +
      `<div class="rec-reasons">${reasons}</div></li>`;
  }).join("");
  if (!list.length) $("recs").innerHTML = '<li class="muted small">The list is empty.</li>';
  state.prevRecIds = new Set(list.map((item) => item.item_id));
}

/* ---------- sending events ---------- */

async function sendEvent(itemId, kind, extra = {}) {
  const entry = logSent(kind, itemId);
  const sentAt = performance.now();
  const user = state.user;
  try {
    const res = await fetchJSON("/api/events", { method: "POST", body: { user_id: user, item_id: itemId, kind, ...extra } });
    if (res && res.event_id && user === state.user) {
      state.sent.set(res.event_id, { sentAt, kind, itemId });
      entry.title = `event ${res.event_id}`;
      if (isNum(res.ts)) entry.querySelector(".time").textContent = fmtTime(res.ts);
      measure(res.event_id); // the list may have arrived before this response
    }
    return res;
  } catch (error) {
    entry.classList.add("failed");
    entry.title = error.message;
    entry.querySelector(".time").textContent = "failed";
    throw error;
  }
}

function logSent(kind, itemId) {
  const li = document.createElement("li");
  const title = (state.byId.get(itemId) || {}).title || itemId;
  li.innerHTML = `<span class="kind">${escapeHTML(KIND_LABEL[kind] || kind)}</span>` +
    `<span class="title">${escapeHTML(title)}</span><span class="time">${fmtTime(Date.now())}</span>`;
  const list = $("sent");
  list.prepend(li);
  while (list.children.length > 30) list.lastElementChild.remove();
  $("sent-empty").hidden = true;
  return li;
}

/** Brief highlight plus a short message on the card (or list entry) that sent an event. */
function feedback(card, text, isError = false) {
  if (!card) return;
  card.classList.add("flash");
  clearTimeout(card._flashTimer);
  card._flashTimer = setTimeout(() => card.classList.remove("flash"), 700);
  const note = card.querySelector(".feedback");
  if (!note) return;
  note.textContent = text;
  note.classList.toggle("error", isError);
  note.classList.add("show");
  clearTimeout(note._timer);
  note._timer = setTimeout(() => note.classList.remove("show"), isError ? 5000 : 1800);
}

async function act(card, itemId, kind, extra, okText) {
  try {
    await sendEvent(itemId, kind, extra);
    feedback(card, okText);
    return true;
  } catch (error) {
    feedback(card, error.message, true);
    showError(`Could not send the ${KIND_LABEL[kind] || kind} event: ${error.message}`);
    return false;
  }
}

/* ---------- catalogue ---------- */

function idPrefix(id) {
  const m = /^(.+?)-\d+$/.exec(id);
  return m ? m[1] : null;
}

/** Chip groups: by id prefix (labelled with the group's most specific category) or by first category. */
function buildGroups(items) {
  const prefixes = new Set(items.map((it) => idPrefix(it.item_id)));
  const usePrefix = !prefixes.has(null) && prefixes.size >= 2 && prefixes.size <= 24;
  const groups = new Map(); // key -> {label, count, labels: Map}
  for (const item of items) {
    const cats = item.categories || [];
    const key = usePrefix ? idPrefix(item.item_id) : (cats[0] || "Other");
    item._group = key;
    if (!groups.has(key)) groups.set(key, { key, count: 0, labels: new Map() });
    const g = groups.get(key);
    g.count += 1;
    const label = usePrefix ? cats[cats.length - 1] : key;
    if (label) g.labels.set(label, (g.labels.get(label) || 0) + 1);
  }
  return [...groups.values()].map((g) => {
    const best = [...g.labels.entries()].sort((a, b) => b[1] - a[1])[0];
    return { key: g.key, count: g.count, label: best ? best[0] : g.key };
  }).sort((a, b) => a.label.localeCompare(b.label));
}

function renderChips(groups) {
  const chip = (key, label, count) =>
    `<button type="button" class="chip${state.group === key ? " active" : ""}" data-group="${escapeHTML(key)}">` +
    `${escapeHTML(label)}<span class="count">${count}</span></button>`;
  $("chips").innerHTML = chip("", "All", state.items.length) + groups.map((g) => chip(g.key, g.label, g.count)).join("");
}

function formatPrice(attributes) {
  const price = attributes && attributes.price;
  if (!isNum(price)) return "";
  const currency = typeof attributes.currency === "string" ? attributes.currency : null;
  if (currency) {
    try { return price.toLocaleString(undefined, { style: "currency", currency }); } catch (_) { /* unknown code */ }
  }
  return price.toLocaleString(undefined, { minimumFractionDigits: 2, maximumFractionDigits: 2 });
}

function cardHTML(item) {
  const id = escapeHTML(item.item_id);
  const cats = (item.categories || []).map(escapeHTML).join(" · ");
  const price = formatPrice(item.attributes);
  const format = item.attributes && typeof item.attributes.format === "string" ? item.attributes.format : "";
  const ratings = [5, 4, 3, 2, 1].map((r) => `<option value="${r}">${"★".repeat(r)}${"☆".repeat(5 - r)} ${r}</option>`).join("");
  return `<article class="card item-card" data-testid="item" data-item-id="${id}">
  <div class="item-body" data-action="click" role="button" tabindex="0" title="Click to send a click event">
    <div class="item-cats">${cats || id}</div>
    <h3 class="item-title">${escapeHTML(item.title || item.item_id)}</h3>
    <p class="item-desc">${escapeHTML(item.description || "")}</p>
    <div class="item-meta">
      <span class="price">${escapeHTML(price)}</span>
      ${item.available === false ? '<span class="unavailable">unavailable</span>' : format ? `<span class="tag">${escapeHTML(format)}</span>` : ""}
    </div>
  </div>
  <div class="item-actions">
    <button type="button" data-action="add_to_cart">Add to cart</button>
    <button type="button" data-action="review" aria-expanded="false">Review</button>
    <span class="feedback" aria-live="polite"></span>
  </div>
  <div class="review-form" hidden>
    <textarea data-testid="review-text" rows="3" placeholder="What did you think of it?"></textarea>
    <div class="row">
      <select name="rating" aria-label="Rating">${ratings}</select>
      <button type="button" class="primary" data-action="send-review">Send review</button>
    </div>
  </div>
</article>`;
}

function applyFilter() {
  const q = state.query.toLowerCase();
  let shown = 0;
  for (const card of $("catalogue").querySelectorAll('[data-testid="item"]')) {
    const item = state.byId.get(card.dataset.itemId);
    const inGroup = !state.group || item._group === state.group;
    const match = !q || item._text.includes(q);
    card.hidden = !(inGroup && match);
    if (!card.hidden) shown += 1;
  }
  $("item-count").textContent = `${shown} of ${state.items.length} items`;
  let empty = $("catalogue-empty");
  if (!shown && state.items.length) {
    if (!empty) {
      empty = document.createElement("p");
      empty.id = "catalogue-empty";
      empty.className = "empty";
      empty.textContent = "No items match this filter.";
      $("catalogue").append(empty);
    }
  } else if (empty) {
    empty.remove();
  }
}

async function loadCatalogue() {
  try {
    const data = await fetchJSON("/api/catalogue");
    state.items = (data && data.items) || [];
  } catch (error) {
    $("catalogue").innerHTML = "";
    showError(`Could not load the catalogue: ${error.message}`);
    return;
  }
  for (const item of state.items) {
    item._text = [item.title, item.description, item.item_id, ...(item.categories || [])].join(" ").toLowerCase();
    state.byId.set(item.item_id, item);
  }
  const groups = buildGroups(state.items);
  renderChips(groups);
  $("catalogue").innerHTML = state.items.length
    ? state.items.map(cardHTML).join("")
    : '<p class="empty">The catalogue is empty: no item events have been published yet.</p>';
  applyFilter();
}

/* ---------- wiring ---------- */

function showError(message) {
  const banner = $("error");
  banner.textContent = message;
  clearTimeout(banner._timer);
  banner._timer = setTimeout(() => { banner.textContent = ""; }, 8000);
}

function onCatalogueClick(event) {
  const target = event.target.closest("[data-action]");
  const card = event.target.closest('[data-testid="item"]');
  if (!target || !card) return;
  const itemId = card.dataset.itemId;
  const action = target.dataset.action;
  if (action === "click") {
    act(card, itemId, "click", {}, "click sent");
  } else if (action === "add_to_cart") {
    act(card, itemId, "add_to_cart", {}, "added to cart");
  } else if (action === "review") {
    const form = card.querySelector(".review-form");
    form.hidden = !form.hidden;
    target.setAttribute("aria-expanded", String(!form.hidden));
    if (!form.hidden) form.querySelector("textarea").focus();
  } else if (action === "send-review") {
    const form = card.querySelector(".review-form");
    const textarea = form.querySelector("textarea");
    const text = textarea.value.trim();
    if (!text) { feedback(card, "write a review first", true); textarea.focus(); return; }
    const rating = Number(form.querySelector("select").value);
    const extra = { text, ...(rating >= 1 && rating <= 5 ? { rating } : {}) };
    target.disabled = true;
    act(card, itemId, "review", extra, "review sent").then((ok) => {
      target.disabled = false;
      if (ok) {
        textarea.value = "";
        form.hidden = true;
        card.querySelector('[data-action="review"]').setAttribute("aria-expanded", "false");
      }
    });
  }
}

function onRecClick(event) {
  const li = event.target.closest('[data-testid="rec"]');
  if (!li) return;
  const itemId = li.dataset.itemId;
  feedback(li, "");
  sendEvent(itemId, "click").catch((error) => showError(`Could not send the click event: ${error.message}`));
}

function init() {
  const userInput = $("user");
  const user = initialUser();
  userInput.value = user;
  state.user = user;
  try { localStorage.setItem("recstream.user", user); } catch (_) { /* ignore */ }
  resetPanel();
  connect();

  let userTimer = null;
  userInput.addEventListener("input", () => {
    clearTimeout(userTimer);
    userTimer = setTimeout(() => setUser(userInput.value), 600);
  });
  userInput.addEventListener("change", () => { clearTimeout(userTimer); setUser(userInput.value); });
  userInput.addEventListener("keydown", (e) => { if (e.key === "Enter") { clearTimeout(userTimer); setUser(userInput.value); } });

  let searchTimer = null;
  $("search").addEventListener("input", (e) => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => { state.query = e.target.value.trim(); applyFilter(); }, 150);
  });
  $("chips").addEventListener("click", (e) => {
    const chip = e.target.closest("[data-group]");
    if (!chip) return;
    state.group = chip.dataset.group;
    for (const c of $("chips").children) c.classList.toggle("active", c === chip);
    applyFilter();
  });

  const catalogue = $("catalogue");
  catalogue.addEventListener("click", onCatalogueClick);
  catalogue.addEventListener("keydown", (e) => {
    if ((e.key === "Enter" || e.key === " ") && e.target.matches('[data-action="click"]')) {
      e.preventDefault();
      onCatalogueClick(e);
    }
  });
  $("recs").addEventListener("click", onRecClick);
  $("recs").addEventListener("keydown", (e) => { if (e.key === "Enter") onRecClick(e); });

  loadCatalogue();
}

init();
