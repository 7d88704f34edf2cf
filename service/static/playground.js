// The dgserve playground: text and Sudoku over the WebSocket API, every denoising step drawn.
// No framework, no build step: ES modules served by the gateway from service/static/.

import { Connection, fetchModels, loadKey, randomSeed, saveKey } from "./api.js";
import { EXAMPLES, badness, clashes, normalizePuzzle, overlay, stepCells } from "./sudoku.js";

const $ = (id) => document.getElementById(id);

const app = {
  key: loadKey(),
  models: [],
  runsByRef: new Map(),   // ref -> run (our ref, echoed in `queued`, validation errors, `sudoku_result`)
  runsByRid: new Map(),   // request_id -> run
  seq: 0,
  text: null,             // the text run shown
  sudoku: null,           // the Sudoku run shown
};

const conn = new Connection({
  onEvent: route,
  onState: showConnection,
  onLost: (message) => {
    for (const run of activeRuns()) run.fail("connection_closed", message || "the connection closed");
  },
});

// ───────────────────────────────────────────────────────────── shared bits

function activeRuns() {
  return [app.text, app.sudoku].filter((r) => r && !r.ended);
}

function newRef(kind) {
  app.seq += 1;
  return `pg-${kind}-${Date.now().toString(36)}-${app.seq}`;
}

function showConnection(state, detail) {
  const pill = $("conn");
  pill.dataset.state = state;
  pill.textContent = { connecting: "connecting…", open: "connected", closed: "disconnected", offline: "offline",
                       refused: "refused" }[state] || state;
  pill.title = detail || "WebSocket connection";
}

function showBanner(message) {
  const b = $("banner");
  b.textContent = message;
  b.hidden = !message;
}

function setStatus(el, state, text) {
  el.dataset.state = state;
  delete el.dataset.valid;
  el.textContent = text;
}

function showError(el, message) {
  el.textContent = message || "";
  el.hidden = !message;
}

function describeError(event) {
  // a refused message names each field at fault in `errors`; a failed request has only `message`
  const fields = (event.errors || []).map((e) => (e.field ? `${e.field}: ${e.message}` : e.message));
  let text = fields.join("; ") || event.message || event.code || "error";
  if (event.code && !["validation_error", "cancelled"].includes(event.code)) text = `${event.code}: ${text}`;
  if (event.retry_after) text += ` (retry after ${event.retry_after} s)`;
  return text;
}

function fmt(x, digits = 3) {
  return typeof x === "number" && Number.isFinite(x) ? x.toFixed(digits) : "–";
}

function seconds(ms) {
  return `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
}

// One frame per burst of events: steps stream faster than a screen refreshes.
let frameQueued = false;
const dirty = new Set();
function schedule(what) {
  dirty.add(what);
  if (frameQueued) return;
  frameQueued = true;
  requestAnimationFrame(() => {
    frameQueued = false;
    const todo = [...dirty];
    dirty.clear();
    if (todo.includes("text")) renderText();
    if (todo.includes("sudoku")) renderSudoku();
  });
}

// Replay: a finished run's steps again, one at a time, at a pace a person can follow (a small model on a
// CPU finishes in well under a second). Scrubbing, Live or a new run stops it.
const replays = { text: null, sudoku: null };

function stopReplay(kind) {
  if (replays[kind] === null) return;
  clearInterval(replays[kind]);
  replays[kind] = null;
  $(`${kind}-replay`).textContent = "Replay";
  $(`${kind}-replay`).setAttribute("aria-pressed", "false");
}

// `steps()`: how many steps the run shown has now. Each step is drawn when its turn comes (not on the next
// animation frame, which a busy or hidden tab may skip), so every one is seen.
function startReplay(kind, run, steps, perSecond) {
  const render = { text: renderText, sudoku: renderSudoku }[kind];
  stopReplay(kind);
  run.follow = false;
  run.index = 0;
  run.replaying = true;
  render();
  $(`${kind}-replay`).textContent = "Stop";
  $(`${kind}-replay`).setAttribute("aria-pressed", "true");
  replays[kind] = setInterval(() => {
    if (run !== app[kind] || run.index >= steps() - 1) {
      run.replaying = false;
      stopReplay(kind);
      if (run === app[kind]) render();
      return;
    }
    run.index += 1;
    render();
  }, 1000 / perSecond);
}

function endReplay(kind, run) {
  stopReplay(kind);
  run.replaying = false;
}

// Live (follow the newest step) and Replay (toggle) of a panel's timeline; `stepsOf(run)`: a function giving
// how many steps the replay may show, or null when there is nothing to replay.
function setupTimelineButtons(kind, stepsOf) {
  $(`${kind}-live`).addEventListener("click", () => {
    const run = app[kind];
    if (!run) return;
    endReplay(kind, run);
    run.follow = true;
    schedule(kind);
  });
  $(`${kind}-replay`).addEventListener("click", () => {
    const run = app[kind];
    if (!run) return;
    if (replays[kind] !== null) {
      endReplay(kind, run);
      schedule(kind);
      return;
    }
    const steps = stepsOf(run);
    if (steps) startReplay(kind, run, steps, Number($("text-speed").value));
  });
}

// Every server message: to the run it belongs to.
function route(event) {
  if (event.type === "queued") {
    const run = app.runsByRef.get(event.ref);
    if (!run) return;
    app.runsByRid.set(event.request_id, run);
    run.queued(event);
    return;
  }
  if (event.type === "sudoku_result") {
    app.runsByRef.get(event.ref)?.result(event);
    return;
  }
  let run = event.request_id ? app.runsByRid.get(event.request_id) : null;
  if (!run && event.ref) run = app.runsByRef.get(event.ref);
  if (run) {
    run.handle(event);
  } else if (event.type === "error" && event.code !== "unknown_request") {
    showBanner(`Server: ${describeError(event)}`);
  }
}

// An open socket and the message sent, or the reason shown and false.
async function send(run, message) {
  try {
    await conn.ready(app.key);
  } catch (err) {
    run.fail("connection_refused", err.message);
    if (err.status === 401) $("api-key").focus();
    return false;
  }
  if (run.ended) return false;
  if (!conn.send(message)) {
    run.fail("connection_closed", "the connection is not open");
    return false;
  }
  return true;
}

// ───────────────────────────────────────────────────────────── models and key

async function loadModels() {
  const select = $("model");
  const got = await fetchModels(app.key);
  if (!got.ok) {
    if (got.status === 401) {
      showBanner(`This server needs an API key: ${got.status} ${got.message}. Enter it above and press Save.`);
      showConnection("refused", "the server needs an API key");
    } else {
      showBanner(`Could not list the models: ${got.status ? `${got.status} ` : ""}${got.message}`);
      showConnection(got.status ? "refused" : "offline", got.message);
    }
    return;
  }
  showBanner("");
  // the badge tells the truth from the start: open the connection every run will use
  conn.ready(app.key).catch(() => { /* the badge says why */ });
  app.models = got.models;
  const keep = select.value;
  select.replaceChildren(new Option("server default", ""));
  for (const m of got.models) {
    const label = m.canvas_length ? `${m.id} (canvas ${m.canvas_length})` : m.id;
    select.add(new Option(label, m.id));
  }
  const fallback = got.models.find((m) => m.id === "text") ? "text" : "";
  select.value = [...select.options].some((o) => o.value === keep && keep) ? keep : fallback;
  if (!app.text) drawEmptyCanvas();
}

function setupKey() {
  const input = $("api-key");
  input.value = app.key;
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = input.value.trim();
    const changed = key !== app.key;
    app.key = key;
    saveKey(key);
    if (changed) {  // the open socket was authorised with the old key
      for (const run of activeRuns()) run.fail("connection_closed", "the connection closed: the API key changed");
      conn.close();
    }
    $("key-note").textContent = key ? "saved in this browser" : "no key saved";
    loadModels();
  });
}

// ───────────────────────────────────────────────────────────── tabs

function setupTabs() {
  const tabs = [$("tab-text"), $("tab-sudoku")];
  const select = (tab, focus) => {
    for (const t of tabs) {
      const on = t === tab;
      t.setAttribute("aria-selected", String(on));
      t.tabIndex = on ? 0 : -1;
      $(t.getAttribute("aria-controls")).hidden = !on;
    }
    if (focus) tab.focus();
    const mode = tab.id === "tab-sudoku" ? "#sudoku" : "#text";
    if (location.hash !== mode) history.replaceState(null, "", mode);
  };
  tabs.forEach((tab, i) => {
    tab.addEventListener("click", () => select(tab, false));
    tab.addEventListener("keydown", (e) => {
      let next = null;
      if (e.key === "ArrowRight") next = tabs[(i + 1) % tabs.length];
      else if (e.key === "ArrowLeft") next = tabs[(i - 1 + tabs.length) % tabs.length];
      else if (e.key === "Home") next = tabs[0];
      else if (e.key === "End") next = tabs[tabs.length - 1];
      if (next) { e.preventDefault(); select(next, true); }
    });
  });
  const fromHash = () => select(location.hash === "#sudoku" ? tabs[1] : tabs[0], false);
  window.addEventListener("hashchange", fromHash);
  fromHash();
}

// ───────────────────────────────────────────────────────────── text mode

class TextRun {
  constructor(body, canvasLength) {
    this.ref = body.ref;
    this.body = body;
    this.rid = null;
    this.canvasLength = canvasLength;
    this.history = [];      // every step event, in order
    this.canvases = [];     // committed canvases
    this.done = null;
    this.error = null;
    this.ended = false;
    this.cancelWanted = false;
    this.notes = [];
    this.started = performance.now();
    this.elapsed = null;
    this.index = -1;        // step shown
    this.follow = true;     // follow the newest step
  }

  queued(event) {
    this.rid = event.request_id;
    this.model = event.model;
    this.seed = event.seed;
    setStatus($("text-status"), "queued", `Queued: request ${event.request_id.slice(0, 8)} on ${event.model}, seed ${event.seed}.`);
    if (this.cancelWanted) conn.send({ type: "cancel", request_id: this.rid });
  }

  handle(event) {
    switch (event.type) {
      case "step":
        if (!this.history.length) {
          setStatus($("text-status"), "running", `Denoising: request ${this.rid.slice(0, 8)} on ${this.model}.`);
        }
        this.history.push(event);
        if (this.follow) this.index = this.history.length - 1;
        break;
      case "canvas":
        this.canvases.push(event);
        break;
      case "restarted":
        this.history = [];
        this.canvases = [];
        this.index = -1;
        this.notes.push(`a worker took the request over (attempt ${event.attempt}); the drafts started over`);
        break;
      case "done":
        this.done = event;
        this.finish();
        break;
      case "error":
        if (event.code === "unknown_request") return;  // a cancel that came after the end
        this.fail(event.code, describeError(event));
        return;
      default:
        return;
    }
    schedule("text");
  }

  finish() {
    this.ended = true;
    this.elapsed = performance.now() - this.started;
    const d = this.done;
    const u = d.usage;
    setStatus($("text-status"), "done",
      `Done: ${u.completion_tokens} tokens in ${u.denoising_steps} steps (${u.canvases} canvas${u.canvases === 1 ? "" : "es"}), `
      + `finish_reason ${d.finish_reason}, ${seconds(this.elapsed)}.`);
    textIdle();
    renderText();
  }

  fail(code, message) {
    if (this.ended) return;
    this.ended = true;
    this.elapsed = performance.now() - this.started;
    if (code === "cancelled") {
      const n = this.history.length;
      setStatus($("text-status"), "cancelled", `Cancelled after ${n} step${n === 1 ? "" : "s"}.`);
    } else {
      this.error = { code, message };
      setStatus($("text-status"), "error", "Failed: see the message below.");
      showError($("text-error"), message);
    }
    textIdle();
    renderText();
  }

  cancel() {
    if (this.ended) return;
    this.cancelWanted = true;
    setStatus($("text-status"), "cancelling", "Cancelling…");
    if (this.rid) conn.send({ type: "cancel", request_id: this.rid });
  }
}

function readParams() {
  const out = {};
  for (const input of document.querySelectorAll("#text-form [data-param]")) {
    const raw = input.value.trim();
    if (raw === "") continue;
    if (input.dataset.kind === "seed") {  // digits, kept exact (api.js sends them as a JSON number)
      out[input.dataset.param] = raw;
      continue;
    }
    const value = Number(raw);
    // a malformed number goes as typed: the server names the field and the limit
    out[input.dataset.param] = Number.isFinite(value) ? value : raw;
  }
  return out;
}

function canvasLengthFor(model) {
  const m = app.models.find((x) => x.id === model) || app.models.find((x) => x.id === "text") || app.models[0];
  return m?.canvas_length || 64;
}

async function startText(e) {
  e?.preventDefault();
  if (app.text && !app.text.ended) return;
  const prompt = $("prompt").value;
  const model = $("model").value;
  const body = { type: "generate", ref: newRef("text"), ...readParams() };
  if (model) body.model = model;
  if ($("chat").checked) body.messages = [{ role: "user", content: prompt }];
  else body.prompt = prompt;

  stopReplay("text");
  if (app.text) app.runsByRef.delete(app.text.ref);
  const run = new TextRun(body, canvasLengthFor(model));
  app.text = run;
  app.runsByRef.set(run.ref, run);
  showError($("text-error"), "");
  setStatus($("text-status"), "connecting", "Sending…");
  $("text-run").disabled = true;
  $("text-cancel").disabled = false;
  drawEmptyCanvas(run.canvasLength);
  renderText();  // nothing of the previous run stays on screen: stats, usage, timeline, text
  await send(run, body);
}

function textIdle() {
  $("text-run").disabled = false;
  $("text-cancel").disabled = true;
}

// The canvas cells: built once per canvas length, updated in place.
function drawEmptyCanvas(length) {
  const n = length || canvasLengthFor($("model").value);
  const grid = $("text-canvas");
  if (grid.children.length !== n) {
    const cells = [];
    for (let i = 0; i < n; i++) {
      const li = document.createElement("li");
      li.className = "cell empty";
      const tok = document.createElement("span");
      tok.className = "tok";
      const id = document.createElement("span");
      id.className = "id";
      li.append(tok, id);
      cells.push(li);
    }
    grid.replaceChildren(...cells);
  }
  grid.style.setProperty("--cols", String(n <= 16 ? n : n <= 128 ? 8 : 16));
  for (const li of grid.children) {
    li.className = "cell empty";
    li.children[0].textContent = "";
    li.children[1].textContent = "";
    li.removeAttribute("title");
  }
}

// A token as it can be seen: spaces, line breaks and tabs made visible.
function visible(token) {
  if (token === "") return "∅";
  return token.replace(/ /g, "·").replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/\r/g, "␍");
}

function entropyLevel(h) {
  // 0..1 for the bar: sqrt so that the interesting range near the acceptance bound stays visible
  return Math.min(1, Math.sqrt(Math.max(0, h) / 6));
}

function renderText() {
  const run = app.text;
  if (!run) return;
  const slider = $("text-timeline");
  const n = run.history.length;
  slider.max = String(Math.max(0, n - 1));
  slider.disabled = n === 0;
  if (run.follow || run.index >= n) run.index = n - 1;
  slider.value = String(Math.max(0, run.index));
  $("text-live").disabled = run.follow || n === 0;
  $("text-live").setAttribute("aria-pressed", String(run.follow));
  $("text-replay").disabled = !run.ended || n < 2;

  const step = run.history[run.index];
  if (!step) {
    $("text-timeline-label").textContent = "no steps yet";
    for (const id of ["canvas", "step", "accepted", "entropy"]) $(`text-stat-${id}`).textContent = "–";
    renderTextOutput(run, null);
    renderUsage(run);
    return;
  }
  const prev = run.index > 0 && run.history[run.index - 1].canvas === step.canvas ? run.history[run.index - 1] : null;
  const ids = step.draft_ids || [];
  if ($("text-canvas").children.length !== ids.length) drawEmptyCanvas(ids.length);
  const tokens = Array.isArray(step.draft_tokens) && step.draft_tokens.length === ids.length ? step.draft_tokens : null;
  const mask = Array.isArray(step.accepted_mask) && step.accepted_mask.length === ids.length ? step.accepted_mask : null;
  const entropy = Array.isArray(step.entropy) && step.entropy.length === ids.length ? step.entropy : null;
  const committed = run.canvases.find((c) => c.canvas === step.canvas);
  const grid = $("text-canvas");
  grid.dataset.mask = mask ? "yes" : "no";
  grid.dataset.tokens = tokens ? "yes" : "no";
  // the step that committed its canvas: the argmax draft became the text, so no position is a draft any more
  const final = Boolean(committed && committed.steps === step.step);
  grid.classList.toggle("committed", final);

  const cells = grid.children;
  for (let i = 0; i < ids.length; i++) {
    const li = cells[i];
    const changed = prev ? prev.draft_ids[i] !== ids[i] : false;
    let cls = "cell";
    if (final) cls += " fin";
    else if (mask) cls += mask[i] ? " acc" : " noisy";
    if (changed) cls += " chg";
    const tok = tokens ? tokens[i] : null;
    if (tok !== null && /^<[^<>]+>$/.test(tok)) cls += " special";
    li.className = cls;
    li.children[0].textContent = tok !== null ? visible(tok) : `#${ids[i]}`;
    li.children[1].textContent = tok !== null ? String(ids[i]) : "";
    const h = entropy ? entropy[i] : null;
    li.style.setProperty("--h", h === null ? "0" : entropyLevel(h).toFixed(3));
    li.title = `position ${i} · id ${ids[i]}${tok !== null ? ` · ${JSON.stringify(tok)}` : ""}`
      + (h !== null ? ` · entropy ${h.toFixed(3)}` : "")
      + (final ? " · committed" : mask ? (mask[i] ? " · accepted" : " · renoised") : "")
      + (changed ? " · changed" : "");
  }
  $("text-legend").dataset.mask = mask ? "yes" : "no";
  $("text-legend").dataset.entropy = entropy ? "yes" : "no";

  $("text-stat-canvas").textContent = String(step.canvas + 1);
  $("text-stat-step").textContent = committed ? `${step.step} / ${committed.steps}` : String(step.step);
  $("text-stat-accepted").textContent = `${step.accepted} / ${ids.length}`;
  $("text-stat-entropy").textContent = fmt(step.mean_entropy);
  $("text-timeline-label").textContent =
    `step ${step.step} of canvas ${step.canvas + 1} · ${run.index + 1} / ${n}`
    + `${run.ended ? (run.replaying ? " (replay)" : "") : " (live)"}`;
  renderTextOutput(run, step);
  renderUsage(run);
}

function renderTextOutput(run, step) {
  const out = $("text-output");
  const parts = [];
  const upTo = step ? step.canvas : Infinity;
  for (const c of run.canvases) {
    if (c.canvas > upTo) break;
    if (step && c.canvas === step.canvas && c.steps !== step.step) break;
    const span = document.createElement("span");
    span.className = `committed c${c.canvas % 2}`;
    span.title = `canvas ${c.canvas + 1}, committed after ${c.steps} steps`;
    span.textContent = c.text;
    parts.push(span);
  }
  const shownCommitted = step && run.canvases.some((c) => c.canvas === step.canvas && c.steps === step.step);
  if (step && !shownCommitted) {
    const span = document.createElement("span");
    span.className = "draft";
    span.title = `draft of canvas ${step.canvas + 1} at step ${step.step}`;
    span.textContent = step.draft_text;
    parts.push(span);
  }
  if (run.notes.length) {
    const note = document.createElement("span");
    note.className = "note block";
    note.textContent = run.notes.join("; ");
    parts.push(note);
  }
  if (!parts.length) {
    const span = document.createElement("span");
    span.className = "note";
    span.textContent = run.ended ? "(nothing)" : "waiting for the first step…";
    parts.push(span);
  }
  out.replaceChildren(...parts);
}

function renderUsage(run) {
  const dl = $("text-usage");
  if (!run.done) { dl.hidden = true; return; }
  const u = run.done.usage;
  const rows = [
    ["finish_reason", run.done.finish_reason],
    ["prompt_tokens", u.prompt_tokens],
    ["completion_tokens", u.completion_tokens],
    ["canvases", u.canvases],
    ["denoising_steps", u.denoising_steps],
    ["tokens_per_forward", fmt(u.tokens_per_forward, 2)],
    ["seed", run.seed ?? "–"],  // exact (a string of digits): put it in the seed field to run this again
    ["wall time", seconds(run.elapsed)],
  ];
  dl.replaceChildren(...rows.map(([k, v]) => {
    const div = document.createElement("div");
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = k;
    dd.textContent = String(v);
    dd.dataset.usage = k;
    div.append(dt, dd);
    return div;
  }));
  dl.hidden = false;
}

function setupText() {
  $("text-form").addEventListener("submit", startText);
  $("model").addEventListener("change", () => { if (!app.text) drawEmptyCanvas(); });
  $("text-cancel").addEventListener("click", () => app.text?.cancel());
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) startText(e);
  });
  $("text-timeline").addEventListener("input", (e) => {
    const run = app.text;
    if (!run) return;
    endReplay("text", run);
    run.index = Number(e.target.value);
    run.follow = !run.ended && run.index === run.history.length - 1;
    schedule("text");
  });
  setupTimelineButtons("text", (run) => () => run.history.length);
  drawEmptyCanvas(64);
}

// ───────────────────────────────────────────────────────────── Sudoku mode

class SudokuRun {
  constructor(body) {
    this.ref = body.ref;
    this.puzzle = body.puzzle;
    this.wanted = body.attempts;
    this.seed = body.seed ?? null;
    this.attempts = [];        // in attempt order
    this.byRid = new Map();
    this.outcome = null;
    this.error = null;
    this.ended = false;
    this.cancelWanted = false;
    this.focus = null;         // rid the user chose; null: the leading attempt
    this.index = -1;
    this.follow = true;
    this.started = performance.now();
  }

  queued(event) {
    // attempt i runs with seed + i (the server's numbering): the order whatever order the streams arrive in
    const order = attemptIndex(this.seed, event.seed) ?? this.attempts.length;
    const attempt = { rid: event.request_id, seed: event.seed, order, history: [], state: "queued", final: null, error: null };
    this.byRid.set(event.request_id, attempt);
    this.attempts.push(attempt);
    this.attempts.sort((a, b) => a.order - b.order);
    this.attempts.forEach((a, i) => { a.n = i + 1; });
    if (this.attempts.length === 1) {
      setStatus($("sudoku-status"), "running", `Solving: ${this.wanted} attempt${this.wanted === 1 ? "" : "s"} `
        + `side by side, seed ${this.seed}.`);
    }
    if (this.cancelWanted) conn.send({ type: "cancel", request_id: event.request_id });
    schedule("sudoku");
  }

  handle(event) {
    const a = this.byRid.get(event.request_id);
    if (event.type === "error" && !a) {  // about the message itself (validation, overload)
      this.fail(event.code, describeError(event));
      return;
    }
    if (!a) return;
    switch (event.type) {
      case "step": {
        if (a.state !== "queued" && a.state !== "running") return;  // stopped by the verdict: steps in flight
        const grid = overlay(this.puzzle, stepCells(this.puzzle, event));
        a.history.push({ step: event.step, grid, mask: event.accepted_mask, entropy: event.entropy,
                         accepted: event.accepted, meanEntropy: event.mean_entropy });
        a.state = "running";
        break;
      }
      case "restarted":
        a.history = [];
        break;
      case "done":
        a.final = event;
        a.state = "done";
        a.grid = overlay(this.puzzle, stepCells(this.puzzle, { draft_ids: event.token_ids, draft_text: event.text }));
        break;
      case "error":
        if (event.code === "unknown_request") return;
        if (a.state === "done" || a.state === "stopped" || a.state === "failed") {
          // the run's own final error (every attempt failed): it repeats an attempt's error
          if (!this.outcome) this.fail(event.code, describeError(event));
          return;
        }
        a.state = event.code === "cancelled" ? "stopped" : "failed";
        a.error = event;
        if (!this.outcome && this.attempts.length === this.wanted
            && this.attempts.every((x) => x.state === "stopped" || x.state === "failed")) {
          this.fail(event.code, describeError(event));
          return;
        }
        break;
      default:
        return;
    }
    schedule("sudoku");
  }

  result(event) {
    this.outcome = event;
    if (!this.ended) {
      this.ended = true;
      this.elapsed = performance.now() - this.started;
    }
    this.focus = null;
    this.follow = true;
    // the server stops every attempt still running once it has a verdict
    for (const a of this.attempts) if (a.state === "queued" || a.state === "running") a.state = "stopped";
    const chosen = this.byRid.get(event.request_id);
    const n = chosen ? chosen.n : event.attempt + 1;
    const verdict = event.valid ? "valid" : "not valid";
    if (this.cancelWanted) {
      setStatus($("sudoku-status"), "cancelled", `Cancelled; of the attempts that finished, the best is ${verdict}.`);
    } else {
      setStatus($("sudoku-status"), "done",
        `Done: ${verdict}, attempt ${n} of ${event.attempts}, ${seconds(this.elapsed)}.`);
    }
    $("sudoku-status").dataset.valid = event.valid ? "yes" : "no";
    sudokuIdle();
    renderSudoku();
  }

  fail(code, message) {
    if (this.ended) return;
    this.ended = true;
    this.elapsed = performance.now() - this.started;
    if (code === "cancelled") {
      setStatus($("sudoku-status"), "cancelled", "Cancelled.");
    } else {
      this.error = { code, message };
      setStatus($("sudoku-status"), "error", "Failed: see the message below.");
      showError($("sudoku-error"), message);
    }
    sudokuIdle();
    renderSudoku();
  }

  cancel() {
    if (this.ended) return;
    this.cancelWanted = true;
    setStatus($("sudoku-status"), "cancelling", "Cancelling…");
    for (const a of this.attempts) {
      if (a.state === "queued" || a.state === "running") conn.send({ type: "cancel", request_id: a.rid });
    }
  }

  // The attempt to show: the user's choice, else the chosen one of the result, else the one nearest
  // to a solution right now.
  shown() {
    if (this.focus && this.byRid.has(this.focus)) return this.byRid.get(this.focus);
    if (this.outcome && this.byRid.has(this.outcome.request_id)) return this.byRid.get(this.outcome.request_id);
    let best = null, bestScore = Infinity;
    for (const a of this.attempts) {
      const last = a.history[a.history.length - 1];
      if (!last) continue;
      const score = badness(last.grid);
      if (score < bestScore) { best = a; bestScore = score; }
    }
    return best || this.attempts[0] || null;
  }
}

// Which attempt a seed belongs to (seed - base, exact on 63-bit seeds), or null when it cannot say.
function attemptIndex(base, seed) {
  try {
    const i = BigInt(seed) - BigInt(base);
    return i >= 0n && i < 1024n ? Number(i) : null;
  } catch {
    return null;
  }
}

function readPuzzle() {
  try {
    return { puzzle: normalizePuzzle($("puzzle").value) };
  } catch (err) {
    return { error: err.message };
  }
}

function previewPuzzle() {
  const { puzzle, error } = readPuzzle();
  const check = $("puzzle-check");
  if (error) {
    check.textContent = $("puzzle").value.trim() ? `Not yet a puzzle: ${error}.` : "";
    check.dataset.ok = "no";
  } else {
    const givens = [...puzzle].filter((c) => c !== "0").length;
    check.textContent = `81 cells, ${givens} givens.`;
    check.dataset.ok = "yes";
  }
  if (!app.sudoku || app.sudoku.ended) {
    if (app.sudoku?.ended) {
      if (app.sudoku.puzzle === puzzle) return;  // keep the finished run on screen
      resetSudokuView();
    }
    drawSudoku($("sudoku-grid"), puzzle || "0".repeat(81), puzzle ? puzzle.replace(/0/g, ".") : ".".repeat(81), {});
    $("sudoku-caption").textContent = puzzle ? "The puzzle" : "Type, paste or pick a puzzle";
  }
}

async function startSudoku(e) {
  e?.preventDefault();
  if (app.sudoku && !app.sudoku.ended) return;
  const { puzzle, error } = readPuzzle();
  const body = { type: "sudoku", ref: newRef("sudoku") };
  // a local problem is shown at once; the server checks the rest (and names it) anyway
  if (error) {
    resetSudokuView();
    showError($("sudoku-error"), `puzzle: ${error}`);
    setStatus($("sudoku-status"), "error", "Failed: see the message below.");
    return;
  }
  body.puzzle = puzzle;
  const attempts = $("attempts").value.trim();
  if (attempts !== "") body.attempts = Number(attempts);
  // a seed always goes (drawn here when the field is empty): attempt i is then seed + i, numbered as the
  // server numbers it, and the run can be repeated from the seed shown
  const seed = $("sudoku-seed").value.trim();
  body.seed = seed !== "" ? seed : randomSeed();

  stopReplay("sudoku");
  if (app.sudoku) app.runsByRef.delete(app.sudoku.ref);
  const run = new SudokuRun({ ...body, attempts: body.attempts ?? 8 });
  app.sudoku = run;
  app.runsByRef.set(run.ref, run);
  showError($("sudoku-error"), "");
  setStatus($("sudoku-status"), "connecting", "Sending…");
  $("sudoku-run").disabled = true;
  $("sudoku-cancel").disabled = false;
  schedule("sudoku");
  await send(run, body);
}

function resetSudokuView() {
  stopReplay("sudoku");
  if (app.sudoku) app.runsByRef.delete(app.sudoku.ref);
  app.sudoku = null;
  $("sudoku-attempts").replaceChildren();
  $("sudoku-verdict").hidden = true;
  $("sudoku-verdict").dataset.state = "none";
  renderInfo(null, null, null);
  $("sudoku-timeline").disabled = true;
  $("sudoku-timeline").max = "0";
  $("sudoku-timeline-label").textContent = "no steps yet";
  $("sudoku-live").disabled = true;
  $("sudoku-replay").disabled = true;
  showError($("sudoku-error"), "");
  setStatus($("sudoku-status"), "idle", "Ready.");
}

function sudokuIdle() {
  $("sudoku-run").disabled = false;
  $("sudoku-cancel").disabled = true;
}

// Draws `grid` (81 cells) into `el` (81 children made on first use).
function drawSudoku(el, puzzle, grid, { prev = null, mask = null, mini = false } = {}) {
  if (el.children.length !== 81) {
    const cells = [];
    for (let i = 0; i < 81; i++) {
      const c = document.createElement(mini ? "i" : "span");
      c.className = "sc";
      cells.push(c);
    }
    el.replaceChildren(...cells);
  }
  const bad = clashes(grid);
  for (let i = 0; i < 81; i++) {
    const c = el.children[i];
    const given = puzzle[i] !== "0";
    const d = grid[i];
    let cls = "sc";
    if (given) cls += " given";
    else if (d !== ".") cls += " filled";
    else cls += " blank";
    if (!given && prev && prev[i] !== d) cls += " chg";
    if (!given && mask && mask.length === 81 && !mask[i]) cls += " noisy";
    if (bad.has(i)) cls += " clash";
    if (c.className !== cls) c.className = cls;
    if (!mini) {
      const text = d === "." ? "" : d;
      if (c.textContent !== text) c.textContent = text;
    }
  }
}

function attemptLabel(run, a) {
  const last = a.history[a.history.length - 1];
  const chosen = run.outcome && run.outcome.request_id === a.rid;
  let state;
  if (a.state === "done") {
    const grid = a.grid || last?.grid;
    const n = grid ? badness(grid) : null;
    state = n === 0 ? "complete, no conflicts" : `done, ${n} cell${n === 1 ? "" : "s"} wrong or blank`;
  } else if (a.state === "stopped") state = "stopped";
  else if (a.state === "failed") state = `failed (${a.error?.code || "error"})`;
  else if (a.state === "queued") state = "queued";
  else state = "denoising";
  const step = last ? `step ${last.step}` : "no step yet";
  let brief = { done: "finished", stopped: "stopped", failed: "failed", queued: "", running: "running" }[a.state] ?? "";
  if (a.state === "done") brief = state.startsWith("complete") ? "complete" : "has errors";
  if (chosen) brief = "chosen";
  return { short: `#${a.n}${chosen ? " ★" : ""}`, state: brief,
           long: `Attempt ${a.n} (seed ${a.seed}): ${step}, ${state}${chosen ? ", chosen" : ""}` };
}

function renderSudoku() {
  const run = app.sudoku;
  if (!run) return;
  // attempts: one small grid each
  const box = $("sudoku-attempts");
  const shown = run.shown();
  const buttons = [...box.children];
  if (buttons.length !== run.attempts.length || buttons.some((b, i) => b.dataset.rid !== run.attempts[i].rid)) {
    box.replaceChildren(...run.attempts.map((a) => {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "attempt";
      b.dataset.rid = a.rid;
      const mini = document.createElement("span");
      mini.className = "mini";
      mini.setAttribute("aria-hidden", "true");
      const label = document.createElement("span");
      label.className = "alabel";
      b.append(mini, label);
      b.addEventListener("click", () => {
        run.focus = a.rid;
        run.follow = true;
        schedule("sudoku");
      });
      return b;
    }));
  }
  for (const b of box.children) {
    const a = run.byRid.get(b.dataset.rid);
    const last = a.history[a.history.length - 1];
    drawSudoku(b.children[0], run.puzzle, last ? last.grid : run.puzzle.replace(/0/g, "."), { mini: true });
    const label = attemptLabel(run, a);
    const head = document.createElement("b");
    head.textContent = label.short;
    b.children[1].replaceChildren(head, `${last ? `step ${last.step}` : "queued"}`, document.createElement("br"), label.state);
    b.title = label.long;
    b.setAttribute("aria-label", label.long);
    b.setAttribute("aria-pressed", String(a === shown));
    b.dataset.state = a.state;
    b.classList.toggle("chosen", Boolean(run.outcome && run.outcome.request_id === a.rid));
  }

  // the main grid: the attempt shown, at the step of the timeline
  const slider = $("sudoku-timeline");
  const hist = shown ? shown.history : [];
  const n = hist.length;
  if (run.follow || run.index >= n) run.index = n - 1;
  slider.max = String(Math.max(0, n - 1));
  slider.value = String(Math.max(0, run.index));
  slider.disabled = n === 0;
  $("sudoku-live").disabled = run.follow || n === 0;
  $("sudoku-replay").disabled = !run.ended || n < 2;
  const entry = hist[run.index];
  if (entry) {
    const prev = run.index > 0 ? hist[run.index - 1].grid : null;
    const final = shown.state === "done" && run.index === n - 1;  // the answer: no cell is a draft any more
    drawSudoku($("sudoku-grid"), run.puzzle, entry.grid, { prev, mask: final ? null : entry.mask });
    const label = attemptLabel(run, shown);
    $("sudoku-caption").textContent = `Attempt ${shown.n} of ${run.wanted}${run.focus ? "" : run.outcome ? " (chosen)" : " (leading)"}`
      + ` · step ${entry.step}`;
    $("sudoku-timeline-label").textContent = `step ${entry.step} · ${run.index + 1} / ${n}`
      + `${shown.state === "running" ? " (live)" : run.replaying ? " (replay)" : ""}`;
    $("sudoku-grid").setAttribute("aria-label", `${label.long}. Grid at step ${entry.step}: ${entry.grid}`);
  } else {
    drawSudoku($("sudoku-grid"), run.puzzle, run.puzzle.replace(/0/g, "."), {});
    $("sudoku-grid").setAttribute("aria-label", "Sudoku grid: the puzzle");
    $("sudoku-caption").textContent = run.ended ? "The puzzle" : "The puzzle (waiting for the first step)";
    $("sudoku-timeline-label").textContent = "no steps yet";
  }
  renderInfo(run, shown, entry);
  renderVerdict(run);
}

function renderInfo(run, a, entry) {
  const set = (id, text) => { $(`sudoku-info-${id}`).textContent = text; };
  if (!a) {
    for (const id of ["attempt", "seed", "step", "accepted", "entropy", "blank", "clash", "state"]) set(id, "–");
    return;
  }
  set("attempt", `${a.n} of ${run.wanted}`);
  set("seed", String(a.seed));
  set("step", entry ? String(entry.step) : "–");
  set("accepted", entry ? `${entry.accepted} / 81` : "–");
  set("entropy", entry ? fmt(entry.meanEntropy) : "–");
  set("blank", entry ? String([...entry.grid].filter((c) => c === ".").length) : "–");
  set("clash", entry ? String(clashes(entry.grid).size) : "–");
  set("state", attemptLabel(run, a).state || a.state);
}

function renderVerdict(run) {
  const v = $("sudoku-verdict");
  const r = run.outcome;
  if (!r) {
    v.hidden = true;
    v.dataset.state = "none";
    return;
  }
  v.hidden = false;
  v.dataset.state = r.valid ? "valid" : "invalid";
  const head = document.createElement("p");
  head.className = "verdict-head";
  head.textContent = r.valid ? "✓ Valid solution" : "✗ Not a valid solution";
  const detail = document.createElement("p");
  detail.className = "verdict-detail";
  detail.textContent = r.valid
    ? `Attempt ${r.attempt + 1} of ${r.attempts} solved it in ${r.steps} denoising steps (${r.total_steps} steps over the attempts that finished).`
    : `None of the ${r.attempts} attempt${r.attempts === 1 ? "" : "s"} found a valid grid; the closest is attempt ${r.attempt + 1} (${r.steps} steps).`;
  const parts = [head, detail];
  if (!r.valid && r.problems?.length) {
    const ul = document.createElement("ul");
    ul.className = "problems";
    for (const p of r.problems) {
      const li = document.createElement("li");
      li.textContent = p;
      ul.append(li);
    }
    parts.push(ul);
  }
  v.replaceChildren(...parts);
}

function setupSudoku() {
  const select = $("sudoku-example");
  EXAMPLES.forEach((ex, i) => select.add(new Option(`${ex.name} (${ex.difficulty}, ${[...ex.puzzle].filter((c) => c === ".").length} blanks)`, String(i))));
  select.addEventListener("change", () => {
    const ex = EXAMPLES[Number(select.value)];
    if (!ex) return;
    const rows = [];
    for (let r = 0; r < 9; r++) rows.push(ex.puzzle.slice(9 * r, 9 * r + 9));
    $("puzzle").value = rows.join("\n");
    previewPuzzle();
  });
  if (!$("puzzle").value.trim()) {
    select.value = "0";
    select.dispatchEvent(new Event("change"));
  }
  $("puzzle").addEventListener("input", () => { select.value = ""; previewPuzzle(); });
  $("puzzle").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) startSudoku(e);
  });
  $("sudoku-form").addEventListener("submit", startSudoku);
  $("sudoku-cancel").addEventListener("click", () => app.sudoku?.cancel());
  $("sudoku-timeline").addEventListener("input", (e) => {
    const run = app.sudoku;
    if (!run) return;
    endReplay("sudoku", run);
    const hist = run.shown()?.history || [];
    run.index = Number(e.target.value);
    run.follow = run.index === hist.length - 1;
    if (!run.focus && run.shown()) run.focus = run.shown().rid;  // scrubbing pins the attempt shown
    schedule("sudoku");
  });
  setupTimelineButtons("sudoku", (run) => {
    const shown = run.shown();
    if (!shown) return null;
    if (!run.focus) run.focus = shown.rid;  // replay the attempt shown, whatever the leader
    return () => shown.history.length;
  });
  previewPuzzle();
}

// ───────────────────────────────────────────────────────────── start

document.addEventListener("keydown", (e) => {
  if (e.key !== "Escape") return;
  const sudokuShown = !$("panel-sudoku").hidden;
  const run = sudokuShown ? app.sudoku : app.text;
  if (run && !run.ended) { e.preventDefault(); run.cancel(); }
});

setupKey();
setupTabs();
setupText();
setupSudoku();
loadModels();
document.documentElement.dataset.ready = "yes";
