// The console page: an xterm.js terminal on the console's WebSocket session.
//
// Protocol (DESIGN.md, "WebSocket frames"): binary frames are console bytes
// both ways; text frames are JSON control messages.  Close codes say why a
// session ended; 4001 (taken over) is never retried automatically, or two
// open tabs would take the console from each other for ever.
"use strict";

(function () {
  const body = document.body;
  const NAME = body.dataset.console;
  const CAN_WRITE = body.dataset.canWrite === "true";
  const BUILD_HINT = body.dataset.buildHint || "run scripts/build-web.sh";
  const BACKOFF_MIN_MS = 500;
  const BACKOFF_MAX_MS = 10000;
  const SEND_CHUNK = 16384; // the daemon refuses frames over 64 KiB
  // Replies a terminal sends by itself (cursor position, device attributes):
  // answering queries found in the *replayed* log would type junk into the guest.
  const TERMINAL_REPLY = /^\x1b\[\??[\d;]*[Rcn]$/;
  const SESSION_END_ERRORS = new Set(["disabled", "idle_timeout", "too_slow", "shutdown", "removed", "taken_over"]);

  const $ = (id) => document.getElementById(id);
  const statusEl = $("status");
  const statusText = $("status-text");
  const banner = $("banner");
  const bannerText = $("banner-text");
  const bannerAction = $("banner-action");
  const bannerLink = $("banner-link");
  const actionResult = $("action-result");
  const toolbar = $("toolbar");
  const watchToggle = $("watch-toggle");
  const termSize = $("term-size");
  const dialog = $("confirm");
  const actionButtons = ["btn-break", "btn-sysrq", "btn-nmi", "btn-reset"].map($);

  // --- page state ----------------------------------------------------------------

  const params = new URLSearchParams(window.location.search);
  let watchMode = !CAN_WRITE || params.get("mode") === "watch";
  let ws = null;
  let hello = null; // the current connection's hello frame
  let vmState = null;
  let attempt = 0;
  let retryTimer = null;
  let countdownTimer = null;
  let ending = null; // taken_over / error frame that precedes a close
  let offset = null; // ring offset of the next byte this connection delivers
  let replayEnd = 0;
  let seen = -1; // highest ring offset already written to the terminal
  let replayPending = 0;
  let bannerKind = null;
  let term = null;

  // --- status line and banners ------------------------------------------------------

  function setStatus(text, kind) {
    statusText.textContent = text;
    statusEl.dataset.kind = kind;
  }

  function showBanner(kind, text, opts) {
    const o = opts || {};
    bannerKind = kind;
    banner.className = "banner kind-" + (o.style || "warn");
    banner.dataset.kind = kind;
    bannerText.textContent = text;
    if (o.action) {
      bannerAction.textContent = o.action;
      bannerAction.onclick = o.onAction;
      bannerAction.hidden = false;
    } else {
      bannerAction.hidden = true;
      bannerAction.onclick = null;
    }
    bannerLink.hidden = !o.link;
    banner.hidden = false;
    if (o.focus && o.action) bannerAction.focus();
  }

  function hideBanner(kind) {
    if (kind && bannerKind !== kind) return;
    banner.hidden = true;
    bannerKind = null;
    delete banner.dataset.kind;
  }

  function actionMessage(text, bad) {
    actionResult.textContent = text;
    actionResult.classList.toggle("bad", !!bad);
  }

  function describe() {
    if (!hello) return;
    const who = hello.mode === "watch" ? "Watching as " + hello.user + " (read-only)" : "Connected as " + hello.user;
    const vm = vmState === "running" ? "VM running" : vmState === "stopped" ? "VM stopped" : "VM " + vmState;
    setStatus(who + " · " + vm, vmState === "running" ? "ok" : "warn");
  }

  function updateToolbar() {
    const live = ws !== null && hello !== null && hello.mode === "interactive";
    for (const b of actionButtons) {
      b.disabled = !live;
      b.title = live ? "" : watchMode ? "Watch mode is read-only" : "Not connected";
    }
    watchToggle.checked = watchMode;
    watchToggle.disabled = !CAN_WRITE;
    if (!CAN_WRITE) {
      watchToggle.parentElement.title = "Your role on " + NAME + " is reader: you can watch, not type";
    }
    if (term) term.options.disableStdin = !live;
  }

  // --- terminal ---------------------------------------------------------------------

  if (typeof window.Terminal !== "function" || typeof window.FitAddon !== "object") {
    setStatus("Not connected", "bad");
    showBanner(
      "vendor",
      "The terminal library (xterm.js) did not load, so this page cannot show the console. " +
        "To fix it on the daemon's host: " + BUILD_HINT + ", then reload this page.",
      { style: "error" }
    );
    updateToolbar();
    return;
  }

  term = new window.Terminal({
    cursorBlink: true,
    scrollback: 10000,
    fontFamily: '"DejaVu Sans Mono", "Liberation Mono", Menlo, Consolas, monospace',
    fontSize: 14,
    allowProposedApi: false,
    theme: { background: "#000000", foreground: "#e6edf3" },
  });
  const fit = new window.FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open($("terminal"));
  const encoder = new TextEncoder();

  function refit() {
    try {
      fit.fit();
    } catch (e) {
      return; // hidden or zero-sized: the next resize fits
    }
    termSize.textContent =
      "Size " + term.cols + "×" + term.rows + " (a serial line does not carry it: run stty cols " +
      term.cols + " rows " + term.rows + " in the guest if a program needs it).";
  }
  let fitQueued = false;
  new ResizeObserver(function () {
    if (fitQueued) return;
    fitQueued = true;
    window.requestAnimationFrame(function () {
      fitQueued = false;
      refit();
    });
  }).observe($("term-wrap"));
  refit();

  function send(bytes) {
    if (!ws || ws.readyState !== WebSocket.OPEN) return false;
    for (let i = 0; i < bytes.length; i += SEND_CHUNK) ws.send(bytes.subarray(i, i + SEND_CHUNK));
    return true;
  }

  function canType() {
    return ws !== null && hello !== null && hello.mode === "interactive";
  }

  term.onData(function (data) {
    if (!canType()) return;
    if (replayPending > 0 && TERMINAL_REPLY.test(data)) return;
    send(encoder.encode(data));
  });
  term.onBinary(function (data) {
    if (!canType()) return;
    const bytes = new Uint8Array(data.length);
    for (let i = 0; i < data.length; i++) bytes[i] = data.charCodeAt(i) & 0xff;
    send(bytes);
  });

  function focusToolbar() {
    const first = toolbar.querySelector("button:not([disabled]), select, a, input:not([disabled])");
    (first || toolbar).focus();
  }
  // Alt+F10 is the usual "go to the toolbar" key of web editors; the terminal
  // otherwise keeps every key (Tab included) for the guest.
  term.attachCustomKeyEventHandler(function (e) {
    if (e.altKey && e.key === "F10") {
      if (e.type === "keydown") {
        e.preventDefault();
        focusToolbar();
      }
      return false;
    }
    return true;
  });
  document.addEventListener("keydown", function (e) {
    if (e.altKey && e.key === "F10" && !e.defaultPrevented) {
      e.preventDefault();
      focusToolbar();
    }
  });

  function writeOutput(bytes) {
    let data = bytes;
    let replay = false;
    if (offset !== null) {
      const start = offset;
      offset += data.length;
      replay = start < replayEnd;
      if (seen > start) data = data.subarray(Math.min(data.length, seen - start));
      if (offset > seen) seen = offset;
    }
    if (data.length === 0) return;
    if (replay) {
      replayPending++;
      term.write(data, function () {
        replayPending--;
      });
    } else {
      term.write(data);
    }
  }

  function note(text) {
    term.write("\r\n\x1b[7m[serialmuxd] " + text + "\x1b[0m\r\n");
  }

  // --- connection -------------------------------------------------------------------

  function apiUrl(suffix) {
    return new URL("../api/v1/consoles/" + encodeURIComponent(NAME) + suffix, window.location.href);
  }

  function sessionUrl(ws) {
    const u = apiUrl("/session");
    if (ws) u.protocol = u.protocol === "https:" ? "wss:" : "ws:";
    if (watchMode) u.searchParams.set("mode", "watch");
    return u.href;
  }

  function clearTimers() {
    window.clearTimeout(retryTimer);
    window.clearInterval(countdownTimer);
    retryTimer = countdownTimer = null;
  }

  function connect() {
    clearTimers();
    if (ws) {
      const old = ws;
      ws = null;
      old.close(1000);
    }
    hello = null;
    ending = null;
    setStatus("Connecting to " + NAME + (watchMode ? " (watch only)…" : "…"), "warn");
    const sock = new WebSocket(sessionUrl(true));
    sock.binaryType = "arraybuffer";
    ws = sock;
    let opened = false;
    sock.onopen = function () {
      opened = true;
    };
    sock.onmessage = function (ev) {
      if (sock !== ws) return;
      if (typeof ev.data === "string") {
        let msg;
        try {
          msg = JSON.parse(ev.data);
        } catch (e) {
          return;
        }
        onControl(msg);
      } else {
        writeOutput(new Uint8Array(ev.data));
      }
    };
    sock.onclose = function (ev) {
      if (sock !== ws) return; // replaced on purpose
      ws = null;
      hello = null;
      updateToolbar();
      onClosed(ev.code, opened);
    };
    updateToolbar();
  }

  function onControl(msg) {
    switch (msg.type) {
      case "hello": {
        hello = msg;
        attempt = 0;
        vmState = msg.state;
        replayEnd = msg.log_next;
        if (typeof msg.replay_start === "number") {
          if (seen > msg.log_next) {
            note("the console log restarted; what follows is new");
            seen = -1;
          } else if (seen >= 0 && msg.replay_start > seen) {
            note((msg.replay_start - seen) + " bytes were printed while disconnected: download the log to see them");
          }
          offset = msg.replay_start;
        } else {
          offset = null;
          if (seen >= 0) term.reset();
        }
        if (bannerKind !== "vendor") hideBanner();
        if (vmState === "stopped") showStopped();
        actionMessage("", false);
        describe();
        updateToolbar();
        if (msg.mode === "interactive") term.focus();
        break;
      }
      case "state":
        vmState = msg.state;
        if (msg.state === "stopped") {
          showStopped();
        } else {
          hideBanner("stopped");
        }
        describe();
        break;
      case "taken_over":
        ending = msg;
        break;
      case "error":
        if (SESSION_END_ERRORS.has(msg.error)) {
          ending = msg;
        } else {
          actionMessage(msg.message || msg.error, true);
        }
        break;
      default:
        break;
    }
  }

  function showStopped() {
    showBanner(
      "stopped",
      "The VM is stopped: waiting for it to start. This session stays attached and will show the next boot.",
      { style: "warn" }
    );
  }

  function takeBack() {
    attempt = 0;
    hideBanner();
    connect();
  }

  function onClosed(code, opened) {
    const end = ending;
    ending = null;
    if (code === 4001 || (end && end.type === "taken_over")) {
      const by = end && end.by ? end.by : "another user";
      const peer = end && end.peer ? " from " + end.peer : "";
      setStatus("Disconnected: taken over by " + by, "bad");
      showBanner(
        "taken_over",
        "Taken over by " + by + peer + ". Your session was closed; keys you type are not sent.",
        { style: "error", action: "Take it back", onAction: takeBack }
      );
      return;
    }
    if (code === 4003) {
      const text = end && end.message ? end.message : "This console is disabled or you may no longer use it.";
      setStatus("Disconnected: console disabled", "bad");
      showBanner("disabled", text, { style: "error", action: "Reconnect", onAction: takeBack });
      return;
    }
    if (code === 4004) {
      setStatus("Disconnected: no such console", "bad");
      showBanner("removed", (end && end.message) || "Console " + NAME + " no longer exists.", {
        style: "error",
        link: true,
      });
      return;
    }
    if (code === 4008) {
      setStatus("Disconnected: idle", "warn");
      showBanner("idle", (end && end.message) || "Closed after a time without keystrokes.", {
        style: "info",
        action: "Reconnect",
        onAction: takeBack,
      });
      return;
    }
    if (!opened) {
      probe();
      return;
    }
    let why = "connection lost";
    if (code === 1001) why = "the daemon is restarting";
    else if (end && end.message) why = end.message;
    retry(why);
  }

  // A WebSocket refused before the upgrade shows the page nothing but 1006, so
  // ask the same URL over plain HTTP for the daemon's JSON reason.
  async function probe() {
    let resp;
    let info = null;
    try {
      resp = await fetch(sessionUrl(false), { credentials: "same-origin", cache: "no-store" });
      info = await resp.json();
    } catch (e) {
      retry("cannot reach the daemon");
      return;
    }
    if (resp.status === 401) {
      const next = "console/" + NAME + (watchMode ? "?mode=watch" : "");
      window.location.assign("../login?next=" + encodeURIComponent(next));
      return;
    }
    const known = info && info.error && info.error !== "http_error" && resp.status >= 400 && resp.status < 500;
    if (!known) {
      retry("connection failed");
      return;
    }
    if (resp.status === 429) {
      retry(info.message);
      return;
    }
    const kind = info.error === "disabled" ? "disabled" : "refused";
    setStatus("Not connected: " + (info.error === "disabled" ? "console disabled" : info.error), "bad");
    showBanner(kind, info.message, { style: "error", action: "Try again", onAction: takeBack, link: true });
  }

  function retry(why) {
    clearTimers();
    const delay = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * Math.pow(2, attempt));
    attempt++;
    let left = Math.ceil(delay / 1000);
    const text = function () {
      return "Connection lost (" + why + "): reconnecting in " + left + " s, attempt " + attempt + ".";
    };
    setStatus("Reconnecting…", "bad");
    showBanner("lost", text(), { style: "error", action: "Reconnect now", onAction: connect });
    countdownTimer = window.setInterval(function () {
      left = Math.max(0, left - 1);
      bannerText.textContent = text();
    }, 1000);
    retryTimer = window.setTimeout(connect, delay);
  }

  // --- toolbar ----------------------------------------------------------------------

  function control(msg, label) {
    if (!ws || ws.readyState !== WebSocket.OPEN) {
      actionMessage("Not connected: " + label + " was not sent.", true);
      return;
    }
    ws.send(JSON.stringify(msg));
    actionMessage(label + " sent at " + new Date().toLocaleTimeString() + ".", false);
  }

  $("btn-break").addEventListener("click", function () {
    control({ type: "break" }, "BREAK");
  });
  $("btn-sysrq").addEventListener("click", function () {
    const key = $("sysrq-key").value;
    control({ type: "sysrq", key: key }, "SysRq " + key);
  });

  function confirmThen(title, text, okLabel, then) {
    $("confirm-title").textContent = title;
    $("confirm-text").textContent = text;
    $("confirm-ok").textContent = okLabel;
    dialog.returnValue = "";
    dialog.onclose = function () {
      if (dialog.returnValue === "ok") then();
      term.focus();
    };
    dialog.showModal();
  }

  $("btn-nmi").addEventListener("click", function () {
    confirmThen(
      "Send an NMI to " + NAME + "?",
      "A non-maskable interrupt makes the guest kernel report it, or panic if it is set to (kernel.panic_on_unrecovered_nmi).",
      "Send NMI",
      function () {
        control({ type: "nmi" }, "NMI");
      }
    );
  });
  $("btn-reset").addEventListener("click", function () {
    confirmThen(
      "Reset " + NAME + "?",
      "This is a hard reset, like pressing the reset button: the guest reboots at once without syncing its disks.",
      "Reset VM",
      function () {
        control({ type: "reset" }, "Reset");
      }
    );
  });

  watchToggle.addEventListener("change", function () {
    watchMode = watchToggle.checked || !CAN_WRITE;
    const u = new URL(window.location.href);
    if (watchMode) u.searchParams.set("mode", "watch");
    else u.searchParams.delete("mode");
    window.history.replaceState(null, "", u.pathname.split("/").pop() + u.search);
    attempt = 0;
    hideBanner();
    connect();
  });

  // For tests and for people debugging in the browser console.
  window.serialmuxd = {
    term: term,
    text: function () {
      const buf = term.buffer.active;
      const lines = [];
      for (let i = 0; i < buf.length; i++) lines.push(buf.getLine(i).translateToString(true));
      return lines.join("\n");
    },
    get connected() {
      return hello !== null;
    },
    get mode() {
      return hello ? hello.mode : null;
    },
    get banner() {
      return bannerKind;
    },
  };

  updateToolbar();
  connect();
})();
