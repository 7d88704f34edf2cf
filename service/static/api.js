// The documented API only: GET /v1/models and the WebSocket /ws/generate (messages generate, sudoku,
// cancel). The API key (if the server wants one) is kept in localStorage and sent as a Bearer header
// over HTTP and as ?api_key= on the WebSocket URL.
//
// Seeds are 63-bit integers; a JavaScript number holds integers exactly only up to 2^53. So the page keeps
// every seed as a string of digits: `seed` numbers in the server's messages are read as their digits, and
// a seed string goes out as a JSON number with exactly those digits. A run shown here can be repeated.

const KEY_STORAGE = "dgserve.apiKey";

export function loadKey() {
  try { return localStorage.getItem(KEY_STORAGE) || ""; } catch { return ""; }
}

export function saveKey(key) {
  try {
    if (key) localStorage.setItem(KEY_STORAGE, key); else localStorage.removeItem(KEY_STORAGE);
  } catch { /* storage off (private mode): the key lives for this page only */ }
}

function authHeaders(key) {
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// The served models: {ok: true, models: [{id, canvas_length}]} or {ok: false, status, message}.
export async function fetchModels(key) {
  let resp;
  try {
    resp = await fetch("/v1/models", { headers: authHeaders(key), cache: "no-store" });
  } catch (err) {
    return { ok: false, status: 0, message: `the server is not answering (${err.message})` };
  }
  let body = {};
  try { body = await resp.json(); } catch { /* not JSON */ }
  if (!resp.ok) {
    const message = body?.error?.message || body?.detail || resp.statusText || "request failed";
    return { ok: false, status: resp.status, message };
  }
  return { ok: true, status: resp.status, models: Array.isArray(body.data) ? body.data : [] };
}

// A server message, with every numeric `seed` kept as its exact digits (a string). The pattern cannot
// match inside a JSON string: quotes there are escaped.
export function parseMessage(text) {
  return JSON.parse(text.replace(/"seed":\s*(\d+)(?=\s*[,}])/g, '"seed":"$1"'));
}

// A message for the server: a `seed` given as a string of digits goes as a JSON number of those digits.
export function encodeMessage(message) {
  const marked = JSON.stringify(message, (k, v) => (k === "seed" && typeof v === "string" && /^\d+$/.test(v)
    ? `\u0000seed:${v}\u0000` : v));
  return marked.replace(/"seed":"\\u0000seed:(\d+)\\u0000"/g, '"seed":$1');
}

// A random seed below 2^62 as digits (room for Sudoku's seed + attempt index below the server's 2^63 - 1).
export function randomSeed() {
  const [hi, lo] = crypto.getRandomValues(new Uint32Array(2));
  return ((BigInt(hi & 0x3fffffff) << 32n) | BigInt(lo)).toString();
}

export function wsUrl(key) {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const query = key ? `?api_key=${encodeURIComponent(key)}` : "";
  return `${scheme}://${location.host}/ws/generate${query}`;
}

// Why a WebSocket was refused before it opened: the browser hides the HTTP status of a denied
// handshake, so ask an HTTP endpoint that checks the same key.
async function explainRefusal(key, code) {
  const probe = await fetchModels(key);
  if (probe.status === 401) {
    return { status: 401, message: `401 ${probe.message}: the server needs a valid API key (enter it above)` };
  }
  if (!probe.ok && probe.status === 0) return { status: 0, message: probe.message };
  return { status: null, message: `the server refused the WebSocket connection (code ${code}); `
    + "it may be overloaded or limit connections per client, retry in a moment" };
}

// One WebSocket shared by every run of the page, opened on demand with the current key.
export class Connection {
  constructor({ onEvent, onState, onLost }) {
    this.onEvent = onEvent;       // (event) for every server message
    this.onState = onState;       // (state, detail) state: connecting | open | closed | refused
    this.onLost = onLost;         // (message) the socket closed while it was open
    this.ws = null;
    this.key = null;
    this.opening = null;
  }

  // An open socket for `key` (reusing the current one), or throws an Error with the reason.
  async ready(key) {
    if (this.ws && this.key === key && this.ws.readyState === WebSocket.OPEN) return this.ws;
    if (this.opening && this.key === key) return this.opening;
    this.close();
    this.key = key;
    this.opening = new Promise((resolve, reject) => {
      let opened = false;
      const ws = new WebSocket(wsUrl(key));
      this.ws = ws;
      this.onState("connecting");
      ws.addEventListener("open", () => {
        opened = true;
        this.onState("open");
        resolve(ws);
      });
      ws.addEventListener("message", (msg) => {
        let event;
        try { event = parseMessage(msg.data); } catch { return; }
        this.onEvent(event);
      });
      ws.addEventListener("close", async (ev) => {
        if (this.ws === ws) this.ws = null;
        if (ws.dgReplaced) {  // closed on purpose (a new key): nothing to report
          if (!opened) reject(new Error("the connection was replaced"));
          return;
        }
        if (!opened) {
          const why = await explainRefusal(key, ev.code);
          this.onState("refused", why.message);
          const err = new Error(why.message);
          err.status = why.status;
          reject(err);
          return;
        }
        this.onState("closed");
        if (ev.code !== 1000) {
          const reason = ev.reason ? `: ${ev.reason}` : "";
          this.onLost(`the connection to the server closed (code ${ev.code}${reason})`);
        } else {
          this.onLost(null);
        }
      });
    }).finally(() => { this.opening = null; });
    return this.opening;
  }

  send(message) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(encodeMessage(message));
    return true;
  }

  close() {
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      ws.dgReplaced = true;
      try { ws.close(1000, "page closed the connection"); } catch { /* already closed */ }
    }
  }
}
