// warren management UI: plain JS, no build step, no external resources.
//
// It talks to the RabbitMQ-compatible management API served by the same
// node (/api/...). Credentials live in sessionStorage (gone when the tab
// closes) and go out as HTTP basic auth on every fetch. Views are chosen
// by the location hash (#/overview, #/queues, #/queues/<vhost>/<name>, ...)
// and refresh themselves on a timer while they are shown. As in RabbitMQ's UI,
// #/login/<user>/<password> logs in (and is replaced by #/overview at once,
// so the password does not stay in the address bar or the history).
//
// All text taken from the API is inserted with textContent (never as
// HTML), so queue names or message bodies cannot inject markup.
"use strict";

(function () {
  const AUTH_KEY = "warren.auth";
  const USER_KEY = "warren.user";
  const REFRESH_MS = 5000;
  const OVERVIEW_REFRESH_MS = 2000;
  // The overview chart shows the last CHART_WINDOW_S seconds; on opening it asks the node for
  // its samples of that span (RabbitMQ's msg_rates_age / msg_rates_incr), so it never starts empty.
  const CHART_WINDOW_S = 300;
  const CHART_INCR_S = 5;

  // ===== state =====
  let timer = null;
  let viewToken = 0; // bumped on each route change; stale renders are dropped
  const rateHistory = []; // [{t, publish, deliver, ack, confirm}], oldest first
  let historyLoaded = false; // the node's samples were read into rateHistory

  // ===== small DOM helpers =====
  function $(id) { return document.getElementById(id); }

  // el("tr", {class: "x", onclick: f}, child, "text", ...)
  function el(tag, attrs) {
    const node = document.createElement(tag);
    if (attrs) {
      for (const [k, v] of Object.entries(attrs)) {
        if (v === undefined || v === null || v === false) continue;
        if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
        else if (k === "dataset") Object.assign(node.dataset, v);
        else node.setAttribute(k, v === true ? "" : String(v));
      }
    }
    for (let i = 2; i < arguments.length; i++) append(node, arguments[i]);
    return node;
  }
  function append(node, child) {
    if (child === undefined || child === null || child === false) return;
    if (Array.isArray(child)) { child.forEach((c) => append(node, c)); return; }
    node.appendChild(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  // A colour sample. The colour goes through CSSOM, not a style attribute: the
  // Content-Security-Policy (default-src 'self') blocks inline style attributes.
  // A legend sample of a chart series: its colour, width and dash pattern.
  function lineSwatch(s) {
    const box = svg("svg", { width: 30, height: 10, class: "swatch-line", "aria-hidden": "true" });
    const attrs = { x1: 1, x2: 29, y1: 5, y2: 5, stroke: s.color, "stroke-width": Math.min(s.width, 4) };
    if (s.dash) attrs["stroke-dasharray"] = s.dash;
    box.appendChild(svg("line", attrs));
    return box;
  }
  function svg(tag, attrs) {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    return node;
  }

  function fmtNum(n) {
    if (n === undefined || n === null || n === "") return "";
    if (typeof n !== "number") return String(n);
    return Number.isInteger(n) ? n.toLocaleString("en-US") : n.toFixed(1);
  }
  function fmtRate(n) { return n === undefined || n === null ? "" : (Math.round(n * 10) / 10).toFixed(1) + "/s"; }
  function fmtBytes(n) {
    if (typeof n !== "number") return "";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
  }
  function fmtUptime(ms) {
    if (typeof ms !== "number") return "";
    let s = Math.floor(ms / 1000);
    const d = Math.floor(s / 86400); s %= 86400;
    const h = Math.floor(s / 3600); s %= 3600;
    const m = Math.floor(s / 60);
    return (d ? d + "d " : "") + h + "h " + m + "m";
  }
  function fmtArgs(obj) {
    if (!obj || typeof obj !== "object") return "";
    const keys = Object.keys(obj);
    return keys.length ? keys.map((k) => k + ": " + JSON.stringify(obj[k])).join(", ") : "";
  }
  function rate(stats, key) {
    const d = stats && stats[key + "_details"];
    return d && typeof d.rate === "number" ? d.rate : 0;
  }
  function enc(s) { return encodeURIComponent(s); }

  // ===== API access =====
  class ApiError extends Error {
    constructor(status, reason) { super(reason); this.status = status; }
  }

  function authHeader() {
    const a = sessionStorage.getItem(AUTH_KEY);
    return a ? { Authorization: "Basic " + a } : {};
  }

  async function api(path, opts) {
    opts = opts || {};
    const headers = Object.assign({ Accept: "application/json" }, authHeader());
    let body;
    if (opts.body !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(opts.body);
    }
    let resp;
    try {
      // credentials "omit": the Authorization header is set here, and without this a 401's
      // WWW-Authenticate challenge would make the browser pop up its own login dialog.
      resp = await fetch("api" + path, { method: opts.method || "GET", headers, body, cache: "no-store", credentials: "omit" });
    } catch (e) {
      throw new ApiError(0, "the node did not answer (" + e.message + ")");
    }
    if (resp.status === 401) {
      showLogin("Login failed or session expired.");
      throw new ApiError(401, "not authorised");
    }
    const text = await resp.text();
    let data = null;
    if (text) {
      try { data = JSON.parse(text); } catch (_) { data = text; }
    }
    if (!resp.ok) {
      const reason = data && typeof data === "object" ? (data.reason || data.error) : data;
      throw new ApiError(resp.status, reason || resp.statusText || "HTTP " + resp.status);
    }
    return data;
  }

  function flash(msg, isError) {
    const f = $("flash");
    f.textContent = msg;
    f.className = "flash " + (isError ? "error" : "ok");
    f.hidden = false;
    clearTimeout(flash.t);
    flash.t = setTimeout(() => { f.hidden = true; }, isError ? 8000 : 3000);
  }

  // Runs an action that changes the broker, reports the outcome and refreshes.
  async function act(label, fn) {
    try {
      await fn();
      flash(label);
      route();
    } catch (e) {
      if (e.status !== 401) flash(label + " failed: " + e.message, true);
    }
  }

  // ===== login =====
  function showLogin(msg) {
    stopTimer();
    sessionStorage.removeItem(AUTH_KEY);
    $("nav").hidden = true;
    $("session").hidden = true;
    $("view").replaceChildren();
    $("login").hidden = false;
    $("login-error").textContent = msg || "";
    $("login-user").focus();
  }

  async function login(ev) {
    ev.preventDefault();
    await logInAs($("login-user").value, $("login-pass").value);
  }

  async function logInAs(user, pass) {
    // btoa needs Latin-1; encode UTF-8 first so any password works.
    const token = btoa(String.fromCharCode.apply(null, new TextEncoder().encode(user + ":" + pass)));
    sessionStorage.setItem(AUTH_KEY, token);
    try {
      const who = await api("/whoami");
      sessionStorage.setItem(USER_KEY, who && who.name ? who.name : user);
      $("login-pass").value = "";
      $("login").hidden = true;
      if (!location.hash || location.hash === "#" || location.hash === "#/") location.hash = "#/overview";
      else route();
    } catch (e) {
      if (e.status !== 401) showLogin("Cannot log in: " + e.message);
    }
  }

  function logout() {
    sessionStorage.removeItem(USER_KEY);
    showLogin("");
  }

  // ===== router =====
  function stopTimer() {
    if (timer) clearInterval(timer);
    timer = null;
  }

  const routes = {
    overview: viewOverview,
    nodes: viewNodes,
    connections: viewConnections,
    channels: viewChannels,
    exchanges: viewExchanges,
    queues: viewQueues,
    queue: viewQueue,
    policies: viewPolicies,
    users: viewUsers,
  };

  // #/login/<user>/<password> (RabbitMQ's UI link): the credentials leave the address bar and
  // the history before anything else happens, then the login runs as if typed.
  function loginFromHash() {
    const m = /^#\/login\/([^/]*)\/(.*)$/.exec(location.hash);
    if (!m) return false;
    const dec = (x) => { try { return decodeURIComponent(x); } catch (_) { return x; } };
    history.replaceState(null, "", location.pathname + location.search + "#/overview");
    logInAs(dec(m[1]), dec(m[2]));
    return true;
  }

  function parseHash() {
    const parts = location.hash.replace(/^#\/?/, "").split("/").map((p) => {
      try { return decodeURIComponent(p); } catch (_) { return p; }
    });
    if (parts[0] === "queues" && parts.length >= 3) {
      return { name: "queue", args: [parts[1], parts.slice(2).join("/")] };
    }
    return { name: routes[parts[0]] ? parts[0] : "overview", args: [] };
  }

  function route() {
    if (loginFromHash()) return;
    if (!sessionStorage.getItem(AUTH_KEY)) { showLogin(""); return; }
    stopTimer();
    $("login").hidden = true;
    $("nav").hidden = false;
    $("session").hidden = false;
    $("whoami").textContent = "User: " + (sessionStorage.getItem(USER_KEY) || "");
    const r = parseHash();
    // Away from the overview nothing is sampled: coming back, the chart reads the node's history again.
    if (r.name !== "overview") historyLoaded = false;
    const navName = r.name === "queue" ? "queues" : r.name;
    document.querySelectorAll("#nav a").forEach((a) => a.classList.toggle("active", a.dataset.route === navName));
    const token = ++viewToken;
    const view = routes[r.name];
    const refresh = async () => {
      try {
        await view(token, ...r.args);
        if (token === viewToken) $("updated").textContent = "Updated " + new Date().toLocaleTimeString();
      } catch (e) {
        if (token === viewToken && e.status !== 401) {
          $("view").replaceChildren(el("p", { class: "error" }, "Could not load this page: " + e.message));
        }
      }
    };
    refresh();
    timer = setInterval(() => {
      // Do not redraw under a user who is typing into a form.
      const a = document.activeElement;
      if (a && $("view").contains(a) && /^(INPUT|SELECT|TEXTAREA)$/.test(a.tagName)) return;
      refresh();
    }, r.name === "overview" ? OVERVIEW_REFRESH_MS : REFRESH_MS);
  }

  // Replaces the view only if the user has not navigated away meanwhile.
  function render(token, ...children) {
    if (token !== viewToken) return;
    $("view").replaceChildren(...children.flat());
  }

  // ===== tables =====
  // cols: [{title, get(row) -> text|Node, num?}]
  function table(id, cols, rows, rowAttrs) {
    if (!rows.length) return el("p", { class: "muted", id }, "Nothing here yet.");
    return el("table", { id, class: "grid" },
      el("thead", null, el("tr", null, cols.map((c) => el("th", { class: c.num ? "num" : null }, c.title)))),
      el("tbody", null, rows.map((row) => el("tr", rowAttrs ? rowAttrs(row) : null,
        cols.map((c) => el("td", { class: c.num ? "num" : null }, c.get(row)))))));
  }

  function vhostName(v) { return v === undefined ? "" : v; }

  function danger(label, fn) {
    return el("button", { type: "button", class: "danger", onclick: fn }, label);
  }

  // ===== overview =====
  async function viewOverview(token) {
    const first = !historyLoaded;
    const ov = await api(first ? `/overview?msg_rates_age=${CHART_WINDOW_S}&msg_rates_incr=${CHART_INCR_S}` : "/overview");
    if (first && token === viewToken) {
      historyLoaded = true;
      seedHistory(ov.message_stats || {});
    }
    if (ov.product_name || ov.rabbitmq_version) {
      $("product").textContent = (ov.product_name || "") + " " + (ov.product_version || ov.rabbitmq_version || "");
    }
    const ms = ov.message_stats || {};
    const sample = {
      t: Date.now(),
      publish: rate(ms, "publish"),
      deliver: rate(ms, "deliver_get"),
      ack: rate(ms, "ack"),
      confirm: rate(ms, "confirm"),
    };
    if (token === viewToken) {
      rateHistory.push(sample);
      while (rateHistory.length && rateHistory[0].t < sample.t - CHART_WINDOW_S * 1000) rateHistory.shift();
    }
    const qt = ov.queue_totals || {};
    const ot = ov.object_totals || {};
    const card = (label, value, id) => el("div", { class: "card", id }, el("div", { class: "value" }, fmtNum(value || 0)), el("div", { class: "label" }, label));
    render(token,
      el("h2", null, "Overview"),
      el("p", { class: "muted" }, "Node ", ov.node || "", ov.cluster_name ? " \u00b7 cluster " + ov.cluster_name : ""),
      el("h3", null, "Queued messages"),
      el("div", { class: "cards", id: "queue-totals" },
        card("Ready", qt.messages_ready, "total-ready"),
        card("Unacked", qt.messages_unacknowledged, "total-unacked"),
        card("Total", qt.messages, "total-messages")),
      el("h3", null, "Message rates"),
      rateChart(),
      el("h3", null, "Global counts"),
      el("div", { class: "cards", id: "totals" },
        card("Connections", ot.connections, "total-connections"),
        card("Channels", ot.channels, "total-channels"),
        card("Exchanges", ot.exchanges, "total-exchanges"),
        card("Queues", ot.queues, "total-queues"),
        card("Consumers", ot.consumers, "total-consumers")),
      listenersTable(ov.listeners || []));
  }

  // Colour and line style both differ, so that equal rates (publish = confirm, deliver = ack:
  // the usual steady state) stay visible: the thick solid line under, the thin dashes on top.
  const SERIES = [
    { key: "publish", label: "Publish", color: "#e8730c", width: 5, dash: "" },
    { key: "confirm", label: "Confirm", color: "#9467bd", width: 2, dash: "9 5" },
    { key: "deliver", label: "Deliver / get", color: "#2c7be5", width: 4, dash: "2 6" },
    { key: "ack", label: "Ack", color: "#1a8a1a", width: 2, dash: "14 4 3 4" },
  ];
  const SAMPLE_KEYS = { publish: "publish", confirm: "confirm", deliver: "deliver_get", ack: "ack" };

  // Rates between consecutive samples of the node's history (newest first in the API), as
  // chart points, oldest first.
  function seedHistory(ms) {
    const by = {};
    for (const [k, key] of Object.entries(SAMPLE_KEYS)) {
      const d = ms[key + "_details"];
      if (d && Array.isArray(d.samples)) by[k] = d.samples.slice().sort((a, b) => a.timestamp - b.timestamp);
    }
    const ref = by.publish || Object.values(by)[0];
    if (!ref) return;
    // The node's clock may differ from the browser's: place the newest sample at "now".
    const shift = ref.length ? Date.now() - ref[ref.length - 1].timestamp : 0;
    const points = [];
    for (let i = 1; i < ref.length; i++) {
      const t0 = ref[i - 1].timestamp, t1 = ref[i].timestamp;
      if (!(t1 > t0)) continue;
      const p = { t: t1 + shift };
      for (const k of Object.keys(SAMPLE_KEYS)) {
        const s = by[k];
        p[k] = s && s[i] && s[i - 1] ? Math.max(0, (s[i].sample - s[i - 1].sample) * 1000 / (t1 - t0)) : 0;
      }
      points.push(p);
    }
    rateHistory.splice(0, rateHistory.length, ...points);
  }

  // The smallest of 1, 2, 5, 10, 20, 50, ... that is >= v (at least 5), for round axis labels.
  function niceCeil(v) {
    let step = 1;
    for (;;) {
      for (const m of [1, 2, 5]) if (step * m >= Math.max(v, 5)) return step * m;
      step *= 10;
    }
  }

  // Line chart of the sampled rates, drawn as SVG (scales with the page).
  function rateChart() {
    const W = 600, H = 160, PAD = 34;
    const max = niceCeil(Math.max(0, ...rateHistory.flatMap((s) => SERIES.map((x) => s[x.key]))));
    const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": "message rates" });
    for (let i = 0; i <= 4; i++) {
      const y = PAD / 2 + (H - PAD) * i / 4;
      chart.appendChild(svg("line", { x1: PAD, x2: W - 4, y1: y, y2: y, class: "gridline" }));
      const t = svg("text", { x: PAD - 4, y: y + 4, class: "axis", "text-anchor": "end" });
      const v = max * (4 - i) / 4;
      t.textContent = v >= 10 ? fmtNum(Math.round(v)) : String(Math.round(v * 100) / 100);
      chart.appendChild(t);
    }
    const n = rateHistory.length;
    const now = n ? rateHistory[n - 1].t : Date.now();
    for (const s of SERIES) {
      // Time runs left to right over the last CHART_WINDOW_S seconds; now at the right edge.
      const pts = rateHistory.map((p) => {
        const px = W - 4 - (W - 4 - PAD) * Math.min(1, (now - p.t) / (CHART_WINDOW_S * 1000));
        const py = PAD / 2 + (H - PAD) * (1 - p[s.key] / max);
        return px.toFixed(1) + "," + py.toFixed(1);
      });
      const attrs = { points: pts.join(" "), stroke: s.color, "stroke-width": s.width, class: "series", "data-series": s.key };
      if (s.dash) attrs["stroke-dasharray"] = s.dash;
      if (pts.length) chart.appendChild(svg("polyline", attrs));
    }
    for (const [i, label] of [[0, `-${CHART_WINDOW_S / 60} min`], [1, "now"]]) {
      const t = svg("text", { x: i ? W - 4 : PAD, y: H - 2, class: "axis", "text-anchor": i ? "end" : "start" });
      t.textContent = label;
      chart.appendChild(t);
    }
    const last = rateHistory[n - 1] || {};
    const legend = el("ul", { class: "legend", id: "rates" }, SERIES.map((s) =>
      el("li", { dataset: { series: s.key } },
        lineSwatch(s), s.label + " ",
        el("b", null, fmtRate(last[s.key] || 0)))));
    return el("div", { class: "chartbox" }, chart, legend);
  }

  function listenersTable(listeners) {
    return [el("h3", null, "Listeners"), table("listeners", [
      { title: "Protocol", get: (l) => l.protocol },
      { title: "Bound to", get: (l) => l.ip_address },
      { title: "Port", get: (l) => l.port, num: true },
    ], listeners)];
  }

  // ===== nodes =====
  async function viewNodes(token) {
    const nodes = await api("/nodes");
    render(token, el("h2", null, "Nodes"), table("nodes", [
      { title: "Name", get: (n) => n.name },
      { title: "Running", get: (n) => n.running === false ? el("span", { class: "down" }, "no") : "yes" },
      { title: "Partitions", get: (n) => (n.partitions || []).length ? el("span", { class: "down" }, "cannot reach " + n.partitions.join(", ")) : "" },
      { title: "Role", get: (n) => n.witness ? "witness" : (n.voter === false ? "learner" : (n.voter ? "voter" : "")) },
      { title: "Memory", get: (n) => fmtBytes(n.mem_used) + (n.mem_alarm ? " (alarm)" : "") },
      { title: "Disk free", get: (n) => fmtBytes(n.disk_free) + (n.disk_free_alarm ? " (alarm)" : "") },
      { title: "File descriptors", get: (n) => n.fd_used === undefined ? "" : fmtNum(n.fd_used) + " / " + fmtNum(n.fd_total), num: true },
      { title: "Uptime", get: (n) => fmtUptime(n.uptime) },
      { title: "Type", get: (n) => n.type || "" },
    ], nodes));
  }

  // ===== connections =====
  async function viewConnections(token) {
    const conns = await api("/connections");
    render(token, el("h2", null, "Connections"), table("connections", [
      { title: "Name", get: (c) => c.name },
      { title: "Node", get: (c) => c.node || "" },
      { title: "Virtual host", get: (c) => vhostName(c.vhost) },
      { title: "User", get: (c) => c.user },
      { title: "State", get: (c) => c.state },
      { title: "Protocol", get: (c) => c.protocol },
      { title: "Client", get: (c) => (c.client_properties && c.client_properties.product) || "" },
      { title: "Channels", get: (c) => fmtNum(c.channels), num: true },
      { title: "In", get: (c) => fmtBytes((c.recv_oct_details || {}).rate) + "/s", num: true },
      { title: "Out", get: (c) => fmtBytes((c.send_oct_details || {}).rate) + "/s", num: true },
      { title: "", get: (c) => danger("Close", () => {
        if (confirm("Close connection " + c.name + "?")) {
          act("Closed connection " + c.name, () => api("/connections/" + enc(c.name), { method: "DELETE" }));
        }
      }) },
    ], conns));
  }

  // ===== channels =====
  async function viewChannels(token) {
    const chans = await api("/channels");
    render(token, el("h2", null, "Channels"), table("channels", [
      { title: "Channel", get: (c) => c.name },
      { title: "Node", get: (c) => c.node || "" },
      { title: "Virtual host", get: (c) => vhostName(c.vhost) },
      { title: "User", get: (c) => c.user },
      { title: "Mode", get: (c) => (c.confirm ? "C" : "") + (c.transactional ? "T" : "") },
      { title: "State", get: (c) => c.state },
      { title: "Consumers", get: (c) => fmtNum(c.consumer_count), num: true },
      { title: "Prefetch", get: (c) => fmtNum(c.prefetch_count), num: true },
      { title: "Unacked", get: (c) => fmtNum(c.messages_unacknowledged), num: true },
      { title: "Publish", get: (c) => fmtRate(rate(c.message_stats, "publish")), num: true },
      { title: "Deliver", get: (c) => fmtRate(rate(c.message_stats, "deliver_get")), num: true },
    ], chans));
  }

  // ===== exchanges =====
  async function viewExchanges(token) {
    const [exs, vhosts] = await Promise.all([api("/exchanges"), api("/vhosts")]);
    render(token, el("h2", null, "Exchanges"), table("exchanges", [
      { title: "Virtual host", get: (x) => vhostName(x.vhost) },
      { title: "Name", get: (x) => x.name === "" ? "(AMQP default)" : x.name },
      { title: "Type", get: (x) => x.type },
      { title: "Features", get: (x) => [x.durable ? "D" : "", x.auto_delete ? "AD" : "", x.internal ? "I" : ""].filter(Boolean).join(" ") },
      { title: "Arguments", get: (x) => fmtArgs(x.arguments) },
      { title: "In", get: (x) => fmtRate(rate(x.message_stats, "publish_in")), num: true },
      { title: "Out", get: (x) => fmtRate(rate(x.message_stats, "publish_out")), num: true },
      { title: "", get: (x) => x.name === "" || x.name.startsWith("amq.") ? "" : danger("Delete", () => {
        if (confirm("Delete exchange " + x.name + "?")) {
          act("Deleted exchange " + x.name, () => api("/exchanges/" + enc(x.vhost) + "/" + enc(x.name), { method: "DELETE" }));
        }
      }) },
    ], exs), addExchangeForm(vhosts));
  }

  function vhostSelect(id, vhosts) {
    return el("select", { id }, vhosts.map((v) => el("option", { value: v.name }, v.name)));
  }

  function addExchangeForm(vhosts) {
    const form = el("form", { class: "inline", id: "add-exchange", onsubmit: (ev) => {
      ev.preventDefault();
      const v = $("ax-vhost").value, n = $("ax-name").value;
      act("Declared exchange " + n, () => api("/exchanges/" + enc(v) + "/" + enc(n), {
        method: "PUT", body: { type: $("ax-type").value, durable: $("ax-durable").checked, auto_delete: false, internal: false, arguments: {} },
      }));
    } },
    el("h3", null, "Add an exchange"),
    el("label", null, "Virtual host ", vhostSelect("ax-vhost", vhosts)),
    el("label", null, "Name ", el("input", { id: "ax-name", required: true })),
    el("label", null, "Type ", el("select", { id: "ax-type" }, ["direct", "fanout", "topic", "headers"].map((t) => el("option", null, t)))),
    el("label", null, el("input", { id: "ax-durable", type: "checkbox", checked: true }), " durable"),
    el("button", { type: "submit" }, "Add exchange"));
    return form;
  }

  // ===== queues =====
  async function viewQueues(token) {
    const [qs, vhosts] = await Promise.all([api("/queues"), api("/vhosts")]);
    render(token, el("h2", null, "Queues"), table("queues", [
      { title: "Virtual host", get: (q) => vhostName(q.vhost) },
      { title: "Name", get: (q) => el("a", { href: "#/queues/" + enc(q.vhost) + "/" + enc(q.name), class: "qname" }, q.name) },
      { title: "Type", get: (q) => q.type || "classic" },
      { title: "Node", get: (q) => placement(q) },
      { title: "Features", get: (q) => [q.durable ? "D" : "", q.auto_delete ? "AD" : "", q.exclusive ? "Excl" : "", q.policy ? "Pol: " + q.policy : ""].filter(Boolean).join(" ") },
      { title: "State", get: (q) => q.state || "" },
      { title: "Ready", get: (q) => fmtNum(q.messages_ready), num: true },
      { title: "Unacked", get: (q) => fmtNum(q.messages_unacknowledged), num: true },
      { title: "Total", get: (q) => fmtNum(q.messages), num: true },
      { title: "Consumers", get: (q) => fmtNum(q.consumers), num: true },
      { title: "Incoming", get: (q) => fmtRate(rate(q.message_stats, "publish")), num: true },
      { title: "Deliver / get", get: (q) => fmtRate(rate(q.message_stats, "deliver_get")), num: true },
    ], qs, (q) => ({ dataset: { vhost: q.vhost, queue: q.name } })), addQueueForm(vhosts));
  }

  // A queue's master and its mirrors; synchronised mirrors are marked (as RabbitMQ's "+2").
  function mirrorList(q) {
    const synced = q.synchronised_slave_nodes || [];
    return (q.slave_nodes || []).map((m) => synced.includes(m)
      ? el("span", { class: "mirror synced", title: "synchronised mirror" }, "+" + m + " \u2713")
      : el("span", { class: "mirror unsynced", title: "mirror not synchronised" }, "+" + m + " (unsynchronised)"));
  }

  function placement(q) {
    return el("span", { class: "placement" }, q.node || "", mirrorList(q));
  }

  function addQueueForm(vhosts) {
    return el("form", { class: "inline", id: "add-queue", onsubmit: (ev) => {
      ev.preventDefault();
      const v = $("aq-vhost").value, n = $("aq-name").value;
      act("Declared queue " + n, () => api("/queues/" + enc(v) + "/" + enc(n), {
        method: "PUT", body: { durable: $("aq-durable").checked, auto_delete: false, arguments: {} },
      }));
    } },
    el("h3", null, "Add a queue"),
    el("label", null, "Virtual host ", vhostSelect("aq-vhost", vhosts)),
    el("label", null, "Name ", el("input", { id: "aq-name", required: true })),
    el("label", null, el("input", { id: "aq-durable", type: "checkbox", checked: true }), " durable"),
    el("button", { type: "submit" }, "Add queue"));
  }

  // The "get messages" results survive the periodic refresh of the page.
  let lastGet = { key: null, nodes: [] };

  async function viewQueue(token, vhost, name) {
    const base = "/queues/" + enc(vhost) + "/" + enc(name);
    const [q, bindings] = await Promise.all([api(base), api(base + "/bindings").catch(() => [])]);
    const key = vhost + "\u0000" + name;
    if (lastGet.key !== key) lastGet = { key, nodes: [] };
    const results = el("div", { id: "messages" }, lastGet.nodes);
    const kv = (k, v) => [el("dt", null, k), el("dd", null, v)];
    render(token,
      el("p", null, el("a", { href: "#/queues" }, "\u2190 All queues")),
      el("h2", null, "Queue ", el("span", { id: "queue-name" }, name), el("span", { class: "muted" }, " in virtual host " + vhost)),
      el("div", { class: "cols" },
        el("dl", { class: "props" },
          kv("Type", q.type || "classic"),
          kv("State", q.state || ""),
          kv("Durable", String(!!q.durable)),
          kv("Auto delete", String(!!q.auto_delete)),
          kv("Exclusive", String(!!q.exclusive)),
          kv("Policy", q.policy || ""),
          kv("Arguments", fmtArgs(q.arguments)),
          kv("Node", q.node || ""),
          kv("Mirrors", mirrorList(q))),
        el("dl", { class: "props", id: "queue-counts" },
          kv("Ready", fmtNum(q.messages_ready || 0)),
          kv("Unacked", fmtNum(q.messages_unacknowledged || 0)),
          kv("Total", fmtNum(q.messages || 0)),
          kv("Consumers", fmtNum(q.consumers || 0)),
          kv("Incoming", fmtRate(rate(q.message_stats, "publish"))),
          kv("Deliver / get", fmtRate(rate(q.message_stats, "deliver_get"))),
          kv("Ack", fmtRate(rate(q.message_stats, "ack"))))),
      el("h3", null, "Bindings"),
      table("bindings", [
        { title: "From", get: (b) => b.source === "" ? "(AMQP default)" : b.source },
        { title: "Routing key", get: (b) => b.routing_key },
        { title: "Arguments", get: (b) => fmtArgs(b.arguments) },
      ], bindings || []),
      el("h3", null, "Get messages"),
      el("form", { class: "inline", id: "get-form", onsubmit: (ev) => { ev.preventDefault(); getMessages(base, key); } },
        el("label", null, "Ack mode ", el("select", { id: "get-ackmode" },
          el("option", { value: "ack_requeue_true" }, "Nack message requeue true"),
          el("option", { value: "ack_requeue_false" }, "Automatic ack"),
          el("option", { value: "reject_requeue_true" }, "Reject requeue true"),
          el("option", { value: "reject_requeue_false" }, "Reject requeue false"))),
        el("label", null, "Encoding ", el("select", { id: "get-encoding" },
          el("option", { value: "auto" }, "Auto string / base64"),
          el("option", { value: "base64" }, "base64"))),
        el("label", null, "Messages ", el("input", { id: "get-count", type: "number", min: 1, value: 1, class: "short" })),
        el("button", { type: "submit", id: "get-messages" }, "Get messages")),
      results,
      el("h3", null, "Purge or delete"),
      el("div", { class: "actions" },
        danger("Purge messages", () => {
          if (confirm("Purge all ready messages from " + name + "?")) {
            act("Purged queue " + name, () => api(base + "/contents", { method: "DELETE" }));
          }
        }),
        danger("Delete queue", async () => {
          if (!confirm("Delete queue " + name + "?")) return;
          try {
            await api(base, { method: "DELETE" });
            flash("Deleted queue " + name);
            location.hash = "#/queues";
          } catch (e) {
            if (e.status !== 401) flash("Delete failed: " + e.message, true);
          }
        })));
  }

  async function getMessages(base, key) {
    const count = Math.max(1, parseInt($("get-count").value, 10) || 1);
    try {
      const msgs = await api(base + "/get", {
        method: "POST",
        body: { count, ackmode: $("get-ackmode").value, encoding: $("get-encoding").value, truncate: 50000 },
      });
      const list = Array.isArray(msgs) ? msgs : [];
      const nodes = list.length ? list.map((m, i) => el("div", { class: "message" },
        el("h4", null, "Message " + (i + 1)),
        el("dl", { class: "props" },
          el("dt", null, "Exchange"), el("dd", null, m.exchange === "" ? "(AMQP default)" : m.exchange),
          el("dt", null, "Routing key"), el("dd", null, m.routing_key),
          el("dt", null, "Redelivered"), el("dd", null, String(!!m.redelivered)),
          el("dt", null, "Remaining"), el("dd", null, fmtNum(m.message_count)),
          el("dt", null, "Properties"), el("dd", null, fmtArgs(m.properties)),
          el("dt", null, "Payload"), el("dd", null,
            el("span", { class: "muted" }, fmtNum(m.payload_bytes) + " bytes, encoding: " + m.payload_encoding),
            el("pre", { class: "payload" }, m.payload)))))
        : [el("p", { class: "muted", id: "queue-empty" }, "Queue is empty.")];
      lastGet = { key, nodes };
      $("messages").replaceChildren(...nodes);
    } catch (e) {
      if (e.status !== 401) flash("Get failed: " + e.message, true);
    }
  }

  // ===== policies =====
  async function viewPolicies(token) {
    const [pols, vhosts] = await Promise.all([api("/policies"), api("/vhosts")]);
    render(token, el("h2", null, "Policies"), table("policies", [
      { title: "Virtual host", get: (p) => vhostName(p.vhost) },
      { title: "Name", get: (p) => p.name },
      { title: "Pattern", get: (p) => p.pattern },
      { title: "Apply to", get: (p) => p["apply-to"] },
      { title: "Definition", get: (p) => el("code", null, JSON.stringify(p.definition)) },
      { title: "Priority", get: (p) => fmtNum(p.priority), num: true },
      { title: "", get: (p) => danger("Clear", () => {
        if (confirm("Clear policy " + p.name + "?")) {
          act("Cleared policy " + p.name, () => api("/policies/" + enc(p.vhost) + "/" + enc(p.name), { method: "DELETE" }));
        }
      }) },
    ], pols), el("form", { class: "inline", id: "add-policy", onsubmit: (ev) => {
      ev.preventDefault();
      let definition;
      try { definition = JSON.parse($("ap-def").value); } catch (e) { flash("Definition is not valid JSON: " + e.message, true); return; }
      const v = $("ap-vhost").value, n = $("ap-name").value;
      act("Set policy " + n, () => api("/policies/" + enc(v) + "/" + enc(n), {
        method: "PUT",
        body: { pattern: $("ap-pattern").value, definition, priority: parseInt($("ap-priority").value, 10) || 0, "apply-to": $("ap-apply").value },
      }));
    } },
    el("h3", null, "Add or update a policy"),
    el("label", null, "Virtual host ", vhostSelect("ap-vhost", vhosts)),
    el("label", null, "Name ", el("input", { id: "ap-name", required: true })),
    el("label", null, "Pattern ", el("input", { id: "ap-pattern", placeholder: "^amq\\." })),
    el("label", null, "Apply to ", el("select", { id: "ap-apply" }, ["all", "queues", "exchanges"].map((t) => el("option", null, t)))),
    el("label", null, "Priority ", el("input", { id: "ap-priority", type: "number", value: 0, class: "short" })),
    el("label", { class: "wide" }, "Definition ", el("input", { id: "ap-def", value: '{"ha-mode":"all"}', class: "mono" })),
    el("button", { type: "submit" }, "Set policy")));
  }

  // ===== users =====
  async function viewUsers(token) {
    const users = await api("/users");
    render(token, el("h2", null, "Users"), table("users", [
      { title: "Name", get: (u) => u.name },
      { title: "Tags", get: (u) => Array.isArray(u.tags) ? u.tags.join(", ") : (u.tags || "") },
      { title: "Has password", get: (u) => u.password_hash ? "yes" : "no" },
      { title: "", get: (u) => danger("Delete", () => {
        if (confirm("Delete user " + u.name + "?")) {
          act("Deleted user " + u.name, () => api("/users/" + enc(u.name), { method: "DELETE" }));
        }
      }) },
    ], users), el("form", { class: "inline", id: "add-user", onsubmit: (ev) => {
      ev.preventDefault();
      const n = $("au-name").value;
      act("Saved user " + n, () => api("/users/" + enc(n), {
        method: "PUT", body: { password: $("au-pass").value, tags: $("au-tags").value },
      }));
    } },
    el("h3", null, "Add or update a user"),
    el("label", null, "Username ", el("input", { id: "au-name", required: true })),
    el("label", null, "Password ", el("input", { id: "au-pass", type: "password", required: true })),
    el("label", null, "Tags ", el("input", { id: "au-tags", placeholder: "administrator, monitoring" })),
    el("button", { type: "submit" }, "Save user")));
  }

  // ===== start =====
  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", login);
    $("logout").addEventListener("click", logout);
    window.addEventListener("hashchange", route);
    route();
  });
})();
