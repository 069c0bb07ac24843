// The console list: polls api/v1/consoles every 2 s and updates the table in
// place (rows are keyed by name, so focus and links survive a refresh).
"use strict";

(function () {
  const POLL_MS = 2000;
  const rows = new Map();
  const tbody = document.getElementById("console-rows");
  const refresh = document.getElementById("refresh");
  const errorBox = document.getElementById("list-error");
  const empty = document.getElementById("empty");
  const table = document.getElementById("consoles");
  const STATE_TEXT = { running: "running", stopped: "stopped", disabled: "disabled" };

  function formatBytes(n) {
    if (n < 1024) return n + " B";
    const units = ["KiB", "MiB", "GiB", "TiB"];
    let v = n;
    let i = -1;
    do { v /= 1024; i++; } while (v >= 1024 && i < units.length - 1);
    return (v >= 10 ? v.toFixed(0) : v.toFixed(1)) + " " + units[i];
  }

  function ago(iso) {
    const t = Date.parse(iso);
    if (isNaN(t)) return "";
    const s = Math.max(0, Math.round((Date.now() - t) / 1000));
    if (s < 60) return s + " s";
    const m = Math.floor(s / 60);
    if (m < 60) return m + " min";
    const h = Math.floor(m / 60);
    if (h < 48) return h + " h " + (m % 60) + " min";
    return Math.floor(h / 24) + " days";
  }

  function cell(tr, cls, label) {
    const td = document.createElement("td");
    td.className = cls;
    if (label) td.dataset.label = label;
    tr.appendChild(td);
    return td;
  }

  function makeRow(name) {
    const tr = document.createElement("tr");
    tr.dataset.console = name;
    const href = "console/" + encodeURIComponent(name);
    const nameTd = cell(tr, "name", "");
    const a = document.createElement("a");
    a.href = href;
    a.textContent = name;
    nameTd.appendChild(a);
    const stateTd = cell(tr, "state-cell", "State");
    const badge = document.createElement("span");
    stateTd.appendChild(badge);
    const reason = document.createElement("span");
    reason.className = "sub";
    stateTd.appendChild(reason);
    const sessionTd = cell(tr, "session", "Interactive session");
    const holder = document.createElement("span");
    const since = document.createElement("span");
    since.className = "sub";
    sessionTd.append(holder, since);
    const watchersTd = cell(tr, "num watchers", "Watchers");
    const logTd = cell(tr, "num log", "Log");
    const actions = cell(tr, "actions", "");
    const open = document.createElement("a");
    open.href = href;
    open.className = "button";
    open.textContent = "Open";
    open.setAttribute("aria-label", "Open console " + name);
    const watch = document.createElement("a");
    watch.href = href + "?mode=watch";
    watch.className = "button";
    watch.textContent = "Watch";
    watch.setAttribute("aria-label", "Watch console " + name + " read-only");
    actions.append(open, watch);
    return { tr, badge, reason, holder, since, watchersTd, logTd };
  }

  function setText(el, text) {
    if (el.textContent !== text) el.textContent = text;
  }

  function update(r, c) {
    const state = STATE_TEXT[c.state] || c.state;
    setText(r.badge, state);
    r.badge.className = "state state-" + c.state;
    let why = "";
    if (c.state === "stopped" && c.reason) why = c.reason;
    else if (c.state === "disabled") why = "an owner can enable it";
    setText(r.reason, why);
    r.reason.hidden = !why;
    if (c.session) {
      const t = new Date(c.session.since);
      const when = isNaN(t.getTime()) ? "" : "since " + t.toLocaleTimeString() + " (" + ago(c.session.since) + ")";
      setText(r.holder, c.session.user + " from " + c.session.peer);
      setText(r.since, when);
      r.since.title = c.session.since;
    } else {
      setText(r.holder, "free");
      setText(r.since, "");
    }
    r.since.hidden = !c.session;
    setText(r.watchersTd, String(c.watchers));
    const size = Math.min(c.log.next - c.log.first, c.log.capacity);
    setText(r.logTd, formatBytes(size) + " of " + formatBytes(c.log.capacity));
    r.logTd.title = "offsets " + c.log.first + " to " + c.log.next;
  }

  function render(list) {
    const seen = new Set();
    list.forEach(function (c, i) {
      seen.add(c.name);
      let r = rows.get(c.name);
      if (!r) {
        r = makeRow(c.name);
        rows.set(c.name, r);
      }
      if (tbody.children[i] !== r.tr) tbody.insertBefore(r.tr, tbody.children[i] || null);
      update(r, c);
    });
    for (const [name, r] of rows) {
      if (!seen.has(name)) {
        r.tr.remove();
        rows.delete(name);
      }
    }
    empty.hidden = list.length > 0;
    table.hidden = list.length === 0;
  }

  async function poll() {
    try {
      const resp = await fetch("api/v1/consoles", { credentials: "same-origin", cache: "no-store" });
      if (resp.status === 401) {
        window.location.assign("login");
        return;
      }
      const body = await resp.json();
      if (!resp.ok) throw new Error(body.message || "HTTP " + resp.status);
      render(body.consoles);
      errorBox.hidden = true;
      setText(refresh, "Updated " + new Date().toLocaleTimeString() + " · refreshes every 2 s");
    } catch (e) {
      errorBox.textContent = "Cannot load the console list (" + e.message + "): retrying every 2 s.";
      errorBox.hidden = false;
    }
    window.setTimeout(poll, POLL_MS);
  }

  poll();
})();
