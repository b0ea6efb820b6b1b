// The wgpy server page: talks to the JSON API under /api (see /api/openapi.json).
"use strict";

const HISTORY = 60;                 // points per chart: a minute at one poll a second
let csrf = null;
const charts = new Map();           // client id -> {plot, times, rx, tx, last}
const $ = (sel, root = document) => root.querySelector(sel);

// ---- theme: the system's preference unless the toggle chose -------------------------
function applyTheme(theme) { document.documentElement.dataset.theme = theme; }
applyTheme(localStorage.getItem("theme") ||
  (matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light"));
$("#theme").addEventListener("click", () => {
  const next = document.documentElement.dataset.theme === "dark" ? "light" : "dark";
  localStorage.setItem("theme", next);
  applyTheme(next);
  for (const c of charts.values()) c.plot.redraw(false, true);
});

// ---- API ------------------------------------------------------------------------------
async function api(method, path, body) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET" && csrf) headers["X-CSRF-Token"] = csrf;
  const res = await fetch(path, {method, headers, credentials: "same-origin",
                                 body: body === undefined ? undefined : JSON.stringify(body)});
  if (res.status === 401 && path !== "/api/session") { showLogin(); throw new Error("log in first"); }
  if (!res.ok) {
    let detail = res.statusText;
    try {
      const j = await res.json();
      detail = Array.isArray(j.detail) ? j.detail.map(d => d.msg).join("; ") : j.detail;
    } catch (e) { /* not JSON */ }
    throw new Error(detail);
  }
  return res.status === 204 ? null : res.json();
}

function showLogin() {
  csrf = null;
  $("#app").hidden = true; $("#logout").hidden = true; $("#login").hidden = false;
  $("#password").focus();
}
function showApp() {
  $("#login").hidden = true; $("#app").hidden = false; $("#logout").hidden = false;
  refresh();
}

$("#login").addEventListener("submit", async ev => {
  ev.preventDefault();
  try {
    csrf = (await api("POST", "/api/session", {password: $("#password").value})).csrf;
    $("#password").value = ""; $("#login-error").textContent = "";
    showApp();
  } catch (e) { $("#login-error").textContent = e.message; }
});
$("#logout").addEventListener("click", async () => {
  try { await api("DELETE", "/api/session"); } finally { showLogin(); }
});
$("#add").addEventListener("submit", async ev => {
  ev.preventDefault();
  try {
    await api("POST", "/api/clients", {name: $("#new-name").value,
                                       expires: $("#new-expires").value || null});
    $("#new-name").value = ""; $("#new-expires").value = ""; $("#add-error").textContent = "";
    refresh();
  } catch (e) { $("#add-error").textContent = e.message; }
});

// ---- numbers in words ---------------------------------------------------------------------
function bytes(n) {
  for (const [unit, size] of [["GiB", 2 ** 30], ["MiB", 2 ** 20], ["KiB", 2 ** 10]])
    if (n >= size) return (n / size).toFixed(2) + " " + unit;
  return n + " B";
}
function ago(t) {
  if (!t) return "never";
  const s = Math.max(0, Math.round(Date.now() / 1000 - t));
  if (s < 60) return s + " s ago";
  if (s < 3600) return Math.floor(s / 60) + " min ago";
  return Math.floor(s / 3600) + " h ago";
}

// ---- the clients ----------------------------------------------------------------------------
function makeChart(el) {
  const css = getComputedStyle(document.documentElement);
  const color = name => css.getPropertyValue(name).trim();
  const opts = {
    width: Math.max(200, el.clientWidth), height: 130, legend: {live: false},
    cursor: {show: false},
    // always the last minute, so that the first seconds do not stretch over the width
    scales: {x: {time: true, range: (u, min, max) => max == null ? [0, 1] : [max - HISTORY, max]}},
    series: [{}, {label: "received/s", stroke: () => color("--rx"), width: 2, points: {show: false}},
                 {label: "sent/s", stroke: () => color("--tx"), width: 2, points: {show: false},
                  dash: [6, 4]}],
    axes: [{stroke: () => color("--muted"), grid: {stroke: () => color("--line")}},
           {stroke: () => color("--muted"), grid: {stroke: () => color("--line")}, size: 70,
            values: (u, vals) => vals.map(v => bytes(v))}],
  };
  return new uPlot(opts, [[], [], []], el);
}

function card(c) {
  let el = document.getElementById("client-" + c.id);
  if (el) return el;
  el = $("#client-card").content.firstElementChild.cloneNode(true);
  el.id = "client-" + c.id;
  el.dataset.id = c.id;
  const act = (sel, fn) => $(sel, el).addEventListener("click", async () => {
    $(".error", el).textContent = "";
    try { await fn(); refresh(); } catch (e) { $(".error", el).textContent = e.message; }
  });
  act(".toggle", () => api("PATCH", `/api/clients/${c.id}`, {enabled: el.dataset.enabled !== "true"}));
  act(".rename", async () => {
    const name = prompt("New name", $(".name", el).textContent);
    if (name) await api("PATCH", `/api/clients/${c.id}`, {name});
  });
  act(".set-expiry", () => api("PATCH", `/api/clients/${c.id}`, {expires: $(".expires", el).value}));
  act(".delete", async () => {
    if (confirm(`Delete ${$(".name", el).textContent}? Its device loses the tunnel at once.`)) {
      await api("DELETE", `/api/clients/${c.id}`);
      charts.delete(c.id); el.remove();
    }
  });
  act(".show-qr", async () => {
    const img = $(".qr", el);
    img.hidden = !img.hidden;
    if (!img.hidden) img.src = `/api/clients/${c.id}/qrcode.svg?t=${Date.now()}`;
  });
  act(".link", async () => {
    const link = await api("POST", `/api/clients/${c.id}/link`);
    $(".link-out", el).textContent = `One-time link (1 hour): ${location.origin}${link.url}`;
  });
  $(".download", el).href = `/api/clients/${c.id}/configuration`;
  $("#clients").appendChild(el);
  charts.set(c.id, {plot: makeChart($(".chart", el)), times: [], rx: [], tx: [], last: null});
  return el;
}

function update(c, now) {
  const el = card(c);
  el.dataset.enabled = c.enabled;
  el.classList.toggle("disabled", !c.enabled || c.expired);
  $(".name", el).textContent = c.name;
  $(".download", el).download = c.name + ".conf";
  $(".addresses", el).textContent = c.addresses.join(", ");
  $(".dot", el).classList.toggle("online", c.online);
  $(".dot", el).title = c.online ? "online" : "offline";
  $(".handshake", el).textContent = "last handshake: " + ago(c.last_handshake);
  $(".rx", el).textContent = "↓ " + bytes(c.rx_bytes);
  $(".tx", el).textContent = "↑ " + bytes(c.tx_bytes);
  $(".endpoint", el).textContent = c.endpoint ? "from " + c.endpoint : "";
  $(".toggle", el).textContent = c.enabled ? "Disable" : "Enable";
  $(".expiry", el).textContent = c.expired ? "expired" :
    c.expires ? "expires " + c.expires.slice(0, 10) : "";
  const ch = charts.get(c.id);
  if (ch.last) {
    const dt = Math.max(0.001, now - ch.last.t);
    ch.times.push(now);
    ch.rx.push(Math.max(0, (c.rx_bytes - ch.last.rx) / dt));
    ch.tx.push(Math.max(0, (c.tx_bytes - ch.last.tx) / dt));
    for (const a of [ch.times, ch.rx, ch.tx]) if (a.length > HISTORY) a.shift();
    ch.plot.setData([ch.times, ch.rx, ch.tx]);
  }
  ch.last = {t: now, rx: c.rx_bytes, tx: c.tx_bytes};
}

async function refresh() {
  if (!csrf) return;
  let list;
  try { list = await api("GET", "/api/clients"); } catch (e) { return; }
  const now = Date.now() / 1000;
  const seen = new Set(list.map(c => String(c.id)));
  for (const el of document.querySelectorAll(".client"))
    if (!seen.has(el.dataset.id)) { charts.delete(Number(el.dataset.id)); el.remove(); }
  for (const c of list) update(c, now);
  $("#empty").hidden = list.length > 0;
}

window.addEventListener("resize", () => {
  for (const [id, c] of charts) {
    const el = $(`#client-${id} .chart`);
    if (el) c.plot.setSize({width: Math.max(200, el.clientWidth), height: 130});
  }
});
setInterval(refresh, 1000);

// already logged in (the cookie)? then the session answers with the CSRF token
api("GET", "/api/session").then(s => { csrf = s.csrf; showApp(); }, showLogin);
