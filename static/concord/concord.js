// Concord's small client: countdown timers, a character counter, and connection status.
// No inline scripts anywhere, so a strict Content-Security-Policy holds.
(function () {
  "use strict";

  function pad(n) { return n < 10 ? "0" + n : String(n); }

  function tickTimers() {
    document.querySelectorAll("[data-deadline]").forEach(function (el) {
      var left = Math.max(0, Math.round((Date.parse(el.dataset.deadline) - Date.now()) / 1000));
      el.textContent = Math.floor(left / 60) + ":" + pad(left % 60) + " left";
      el.classList.toggle("urgent", left <= 30);
    });
  }
  setInterval(tickTimers, 1000);
  document.addEventListener("DOMContentLoaded", tickTimers);
  document.addEventListener("htmx:afterSettle", tickTimers);
  document.addEventListener("htmx:oobAfterSwap", tickTimers);

  document.addEventListener("input", function (event) {
    var el = event.target;
    if (el.dataset && el.dataset.counter) {
      var counter = document.getElementById(el.dataset.counter);
      if (counter) counter.textContent = String(el.value.length);
    }
  });

  function setConnection(text, state) {
    var el = document.getElementById("connection");
    if (!el) return;
    el.textContent = text;
    el.dataset.state = state;
  }

  // htmx reconnects on abnormal closes itself; a clean close from a restarting
  // server (1001 "going away") would otherwise leave the page silently stale.
  // Both schedules share one backoff: 250-500 ms, then doubling up to 15-30 s, started over
  // only once the server has sent something (the full-state render), not when a socket opens.
  // htmx's own delay ("full jitter") starts over on open and may be 0 ms, so a server that
  // accepts and then fails (1011: the connect render hit a database error) was retried every
  // 0-1 s by every open page for as long as it failed.
  var failures = 0;
  function reconnectDelay() {  // htmx passes its own retry count: ignored, see above
    var base = Math.min(30000, 500 * Math.pow(2, failures++));
    return base / 2 + Math.random() * base / 2;
  }
  if (window.htmx) htmx.config.wsReconnectDelay = reconnectDelay;
  document.addEventListener("htmx:wsAfterMessage", function () { failures = 0; });
  var socket = null;
  document.addEventListener("htmx:wsOpen", function (event) {
    socket = event.detail.socketWrapper;
    setConnection("", "open");
    document.body.dataset.ws = "open";
  });
  document.addEventListener("htmx:wsClose", function (event) {
    document.body.dataset.ws = "closed";
    var code = event.detail && event.detail.event ? event.detail.event.code : 0;
    if (code === 4403) {
      setConnection("This page is not yours to follow. Please use your own invitation link.", "refused");
      return;
    }
    setConnection("Connection lost — reconnecting…", "reconnecting");
    if ([1006, 1011, 1012, 1013].indexOf(code) < 0 && event.detail && event.detail.socketWrapper) {
      setTimeout(function () { event.detail.socketWrapper.reconnect(); }, reconnectDelay());
    }
  });

  // A tab that was in the background may have been throttled: ask for the current state.
  document.addEventListener("visibilitychange", function () {
    if (document.visibilityState === "visible" && socket && document.body.dataset.ws === "open") {
      socket.send(JSON.stringify({ type: "resync" }));
    }
  });

  // A swapped-in form must not keep a stale error once the participant acts again.
  document.addEventListener("htmx:beforeRequest", function () {
    document.querySelectorAll("#main .error").forEach(function (el) { el.remove(); });
  });
})();

// A request that failed (server or network) must say so, and keep what the person entered.
(function () {
  "use strict";
  function show(text) {
    var el = document.getElementById("connection");
    if (el) { el.textContent = text; el.dataset.state = "error"; }
  }
  document.addEventListener("htmx:responseError", function (event) {
    var xhr = event.detail.xhr;
    show(xhr && xhr.status === 429 ? "Too many requests: please wait a minute and try again."
      : xhr && xhr.status === 503 ? "We could not save that just now. Please try again in a moment."
      : "Something went wrong while saving. Please try again.");
  });
  document.addEventListener("htmx:sendError", function () {
    show("You seem to be offline. Please check your connection and try again.");
  });
  document.addEventListener("htmx:afterRequest", function (event) {
    var el = document.getElementById("connection");
    if (event.detail.successful && el && el.dataset.state === "error") { el.textContent = ""; el.dataset.state = "open"; }
  });
})();

// The rating screen holds several forms, and saving one re-renders the whole screen (as does
// any push from the server). Choices made in the other forms but not yet saved are carried
// over, so nobody has to tick them twice; the form just saved shows what the server stored.
(function () {
  "use strict";
  var pending = null;

  function capture(root, exceptFormId) {
    var forms = {};
    root.querySelectorAll("form[id]").forEach(function (form) {
      if (form.id === exceptFormId) return;
      var fields = {};
      form.querySelectorAll("input[type=radio]:checked").forEach(function (el) { fields[el.name] = el.value; });
      form.querySelectorAll("select").forEach(function (el) { if (el.value) fields[el.name] = el.value; });
      forms[form.id] = fields;
    });
    return forms;
  }

  function restore(root, forms) {
    Object.keys(forms).forEach(function (formId) {
      var form = document.getElementById(formId);
      if (!form || !root.contains(form)) return;
      var fields = forms[formId];
      Object.keys(fields).forEach(function (name) {
        form.querySelectorAll("[name='" + name + "']").forEach(function (el) {
          if (el.type === "radio") { el.checked = el.value === fields[name]; }
          else if (el.tagName === "SELECT") { el.value = fields[name]; }
        });
      });
    });
  }

  // Two renders can land back to back (the response and the push): keep the union of what
  // was captured until it has been put back.
  function remember(forms) {
    pending = pending || {};
    Object.keys(forms).forEach(function (formId) {
      pending[formId] = Object.assign({}, pending[formId] || {}, forms[formId]);
    });
  }

  document.addEventListener("htmx:beforeSwap", function (event) {
    var target = event.detail.target;
    if (!target || target.id !== "main") return;
    var elt = event.detail.requestConfig && event.detail.requestConfig.elt;
    var form = elt && elt.closest ? elt.closest("form") : null;
    var captured = capture(target, form ? form.id : null);
    if (form && pending) delete pending[form.id];  // what the server just stored wins
    remember(captured);
  });
  document.addEventListener("htmx:oobBeforeSwap", function (event) {
    var target = event.detail.target;
    if (target && target.id === "main") remember(capture(target, null));
  });
  // Both events fire synchronously on the swapped-in elements, before anything else can swap.
  function putBack(event) {
    var main = event.target && event.target.id === "main" ? event.target : null;
    if (main && pending) { restore(main, pending); pending = null; }
  }
  document.addEventListener("htmx:afterSwap", putBack);
  document.addEventListener("htmx:oobAfterSwap", putBack);
})();

// Text typed into the form area must survive a re-render of it, above all the full-state render
// every reconnect pushes: the server only knows the last autosaved draft, which lags the typing
// by the autosave delay, or by the whole outage when the network that dropped the socket also
// failed the autosave. Text changed since the last render is put back once the new form area is
// live, and an input event lets the counter and the autosave catch up.
(function () {
  "use strict";
  var typed = null;

  function capture(root, exceptForm) {
    root.querySelectorAll("textarea[id]").forEach(function (el) {
      if (exceptForm && exceptForm.contains(el)) return;  // the form just sent: its response wins
      if (el.value !== el.defaultValue) { typed = typed || {}; typed[el.id] = el.value; }
    });
  }

  document.addEventListener("htmx:beforeSwap", function (event) {
    var target = event.detail.target;
    if (!target || target.id !== "main") return;
    var elt = event.detail.requestConfig && event.detail.requestConfig.elt;
    capture(target, elt && elt.closest ? elt.closest("form") : null);
  });
  document.addEventListener("htmx:oobBeforeSwap", function (event) {
    var target = event.detail.target;
    if (target && target.id === "main") capture(target, null);
  });
  // htmx:load fires once the swapped-in area is processed, so the autosave trigger already
  // holds the server's text and sees the restored one as a change.
  document.addEventListener("htmx:load", function (event) {
    var main = event.target;
    if (!typed || !main || main.id !== "main" || !document.body.contains(main)) return;
    var restore = typed;
    typed = null;
    Object.keys(restore).forEach(function (id) {
      var el = document.getElementById(id);
      if (!el || !main.contains(el) || el.value === restore[id]) return;
      el.value = restore[id];
      el.dispatchEvent(new Event("input", { bubbles: true }));
    });
  });
})();
