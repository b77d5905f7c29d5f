/* Rapport chat page: a dependency-free client of the rapport.v1 WebSocket protocol.
 *
 * What it does, in protocol terms:
 *   - hello with `user` (development mode) or `token`, learnt from GET /v1/page-config;
 *   - turn.start with a client_turn_id; an un-accepted turn.start is sent again,
 *     with the same id, after every reconnect (the server de-duplicates it);
 *   - turn.delta: append text; per turn keep the last seq and ignore seq <= last
 *     (a merged delta covers seq_start..seq); a gap asks for the missing ones;
 *   - after a reconnect: turn.resume {turn_id, after_seq: last seq held} for the
 *     replies it was receiving and for ready.active_turns;
 *   - reconnect with exponential backoff and full jitter (0.5 s doubling to 10 s);
 *   - ping/pong both ways; silence for interval + timeout counts as a dead socket;
 *   - Stop sends turn.cancel; history.get on connect renders the conversation.
 *
 * User and model text only ever reaches the page through textContent.
 */
(() => {
  "use strict";

  const SUBPROTOCOL = "rapport.v1.json";
  const HISTORY_LIMIT = 50;
  const BACKOFF_BASE_MS = 500;
  const BACKOFF_CAP_MS = 10000;
  const OPEN_TIMEOUT_MS = 10000;
  const DEFAULT_HEARTBEAT = { interval_ms: 15000, timeout_ms: 45000 };
  const AUTO_RETRIES = 3;
  const KEYS = { user: "rapport.user", token: "rapport.token" };

  const $ = (id) => document.getElementById(id);
  const ui = {
    app: $("app"),
    status: $("status"),
    statusText: $("status-text"),
    model: $("model"),
    scroller: $("scroller"),
    messages: $("messages"),
    older: $("older"),
    empty: $("empty"),
    notice: $("notice"),
    form: $("composer"),
    input: $("input"),
    send: $("send"),
    stop: $("stop"),
    menuButton: $("menu-button"),
    menu: $("menu"),
    whoami: $("whoami"),
    clear: $("clear"),
    signout: $("signout"),
    signin: $("signin"),
    signinForm: $("signin-form"),
    signinHelp: $("signin-help"),
    signinLabel: $("signin-label"),
    signinValue: $("signin-value"),
    signinError: $("signin-error"),
  };

  const state = {
    config: null,
    conversation: "default",
    credential: null,        // {user} or {token}
    ws: null,
    ready: false,
    stopped: true,           // no automatic reconnect (signed out, or 4401)
    attempt: 0,              // consecutive failed connection attempts
    connects: 0,             // successful handshakes so far (exposed for tests)
    reconnectAt: 0,
    reconnectTimer: 0,
    countdownTimer: 0,
    openTimer: 0,
    pingTimer: 0,
    watchdogTimer: 0,
    lastRx: 0,
    heartbeat: DEFAULT_HEARTBEAT,
    historyQueue: [],        // kinds of outstanding history.get requests, in order
    activeAtReady: null,     // ready.active_turns, resumed once the first history arrives
    historyLoaded: false,
    hasOlder: false,
    entries: [],             // the rendered thread, in order
    turns: new Map(),        // turn_id -> turn state
    pending: null,           // the user's turn.start not yet accepted
    noticeTimer: 0,
  };

  // ------------------------------------------------------------------ helpers

  const storage = {
    get(key) { try { return window.localStorage.getItem(key); } catch { return null; } },
    set(key, value) { try { window.localStorage.setItem(key, value); } catch { /* private mode */ } },
    remove(key) { try { window.localStorage.removeItem(key); } catch { /* private mode */ } },
  };

  function newId() {
    const c = window.crypto;
    if (c && typeof c.randomUUID === "function") return c.randomUUID();
    const bytes = new Uint8Array(16);
    if (c && typeof c.getRandomValues === "function") c.getRandomValues(bytes);
    else for (let i = 0; i < 16; i++) bytes[i] = Math.floor(Math.random() * 256);
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    const hex = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
    return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
  }

  function wsUrl() {
    const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
    const path = (state.config && state.config.ws_path) || "/v1/ws";
    return `${scheme}//${window.location.host}${path}`;
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // "simulated:simulated-companion" -> "simulated-companion"; "/models/SmolLM2" -> "SmolLM2".
  function showModel(name) {
    const parts = String(name).split(/[/:]/).filter(Boolean);
    ui.model.textContent = parts.length ? parts[parts.length - 1] : String(name);
    ui.model.title = String(name);
  }

  function seconds(ms) { return Math.max(1, Math.ceil(ms / 1000)); }

  function nearBottom() {
    const s = ui.scroller;
    return s.scrollHeight - s.scrollTop - s.clientHeight < 96;
  }

  function scrollToBottom() { ui.scroller.scrollTop = ui.scroller.scrollHeight; }

  // ------------------------------------------------------------------ status

  function setStatus(kind, text) {
    ui.status.dataset.state = kind;
    ui.status.dataset.connects = String(state.connects);
    ui.statusText.textContent = text;
    ui.status.title = kind === "reconnecting" ? "Tap to reconnect now" : "";
  }

  function showNotice(text, ms) {
    clearTimeout(state.noticeTimer);
    ui.notice.textContent = text;
    ui.notice.hidden = false;
    if (ms) state.noticeTimer = setTimeout(hideNotice, ms);
  }

  function hideNotice() {
    clearTimeout(state.noticeTimer);
    ui.notice.hidden = true;
    ui.notice.textContent = "";
  }

  // ------------------------------------------------------------------ thread model

  // An entry is one bubble: {key, role, text, status, turnId, id, createdAt, node, bubble, meta, error}.
  function makeEntry(key, role) {
    const node = el("li", `msg ${role}`);
    const bubble = el("div", "bubble");
    const meta = el("div", "meta");
    node.append(bubble, meta);
    return { key, role, text: "", status: "", turnId: "", id: "", createdAt: 0,
             node, bubble, meta, error: null, shown: null };
  }

  const MARKERS = {
    cancelled: "Stopped",
    interrupted: "Interrupted",
    length: "Cut short",
    budget_exceeded: "Timed out",
    error: "Failed",
    failed: "Not sent",
  };

  function paint(entry) {
    const n = entry.node;
    n.dataset.status = entry.status || "";
    if (entry.turnId) n.dataset.turnId = entry.turnId; else delete n.dataset.turnId;
    if (entry.id) n.dataset.messageId = entry.id; else delete n.dataset.messageId;
    if (entry.clientTurnId) n.dataset.clientTurnId = entry.clientTurnId;
    if (entry.shown !== entry.text) {
      const grew = entry.shown !== null && entry.text.startsWith(entry.shown) && entry.bubble.lastChild;
      if (grew && entry.shown.length > 0 && entry.bubble.childNodes.length === 1) {
        entry.bubble.firstChild.appendData(entry.text.slice(entry.shown.length));
      } else {
        entry.bubble.textContent = entry.text;
      }
      entry.shown = entry.text;
    }
    if (entry.createdAt) entry.bubble.title = new Date(entry.createdAt).toLocaleString();
    let label = MARKERS[entry.status] || "";
    if (entry.role === "user" && entry.status === "sending") label = state.ready ? "Sending…" : "Waiting for connection…";
    entry.meta.replaceChildren();
    if (label) {
      const m = el("span", "marker", label);
      m.dataset.kind = entry.status === "sending" && !state.ready ? "queued" : entry.status;
      entry.meta.append(m);
    }
    if (entry.error) n.append(entry.error); // keeps it last
  }

  function setEntryError(entry, text, retry) {
    if (entry.error) entry.error.remove();
    entry.error = null;
    if (text) {
      const box = el("div", "inline-error");
      box.setAttribute("role", "alert");
      box.append(el("span", "", text));
      if (retry) {
        const b = el("button", "retry", "Retry");
        b.type = "button";
        b.addEventListener("click", retry);
        box.append(b);
      }
      entry.error = box;
    }
    paint(entry);
  }

  function render(opts = {}) {
    const stick = opts.stick ?? nearBottom();
    const list = ui.messages;
    let cursor = list.firstChild;
    for (const entry of state.entries) {
      if (entry.node !== cursor) list.insertBefore(entry.node, cursor);
      else cursor = cursor.nextSibling;
    }
    while (cursor) {
      const next = cursor.nextSibling;
      cursor.remove();
      cursor = next;
    }
    ui.empty.hidden = !(state.historyLoaded && state.entries.length === 0);
    ui.older.hidden = !(state.hasOlder && oldestId());
    if (stick) scrollToBottom();
    updateComposer();
  }

  function indexOfKey(key) { return state.entries.findIndex((e) => e.key === key); }

  function oldestId() {
    const first = state.entries.find((e) => e.id);
    return first ? first.id : "";
  }

  function compareIds(a, b) {
    const [am, as] = a.split("-").map(Number);
    const [bm, bs] = b.split("-").map(Number);
    return am - bm || as - bs;
  }

  // Where a turn's reply bubble belongs: right after its user message, else at the
  // end (but before a message still waiting to be accepted).
  function placeReply(turn) {
    const at = state.entries.indexOf(turn.entry);
    if (at >= 0) state.entries.splice(at, 1);
    const userAt = indexOfKey("u:" + turn.turnId);
    if (userAt >= 0) {
      state.entries.splice(userAt + 1, 0, turn.entry);
      return;
    }
    const pendingAt = state.pending ? state.entries.indexOf(state.pending.entry) : -1;
    if (pendingAt >= 0) state.entries.splice(pendingAt, 0, turn.entry);
    else state.entries.push(turn.entry);
  }

  function trackTurn(turnId) {
    let turn = state.turns.get(turnId);
    if (!turn) {
      // A reply the history already showed (so it has ended) is adopted, not duplicated.
      const shown = state.entries.find((e) => e.key === "a:" + turnId);
      const entry = shown || makeEntry("a:" + turnId, "assistant");
      entry.turnId = turnId;
      if (!shown) entry.status = "waiting";
      turn = { turnId, lastSeq: 0, text: shown ? shown.text : "", ended: Boolean(shown),
               finishReason: shown ? shown.status : "", entry,
               cancelWanted: false, cancelSent: false, resumeSent: false, repaired: false, gapAt: -1 };
      state.turns.set(turnId, turn);
      paint(entry);
    }
    return turn;
  }

  function liveTurn() {
    for (const turn of state.turns.values()) if (!turn.ended) return turn;
    return null;
  }

  // ------------------------------------------------------------------ composer

  function updateComposer() {
    const live = liveTurn();
    const busy = Boolean(live || state.pending);
    const text = ui.input.value.trim();
    ui.send.disabled = busy || !text || !state.credential;
    ui.stop.hidden = !busy;
    ui.send.hidden = busy; // Stop takes Send's place while a reply is on its way
    ui.stop.disabled = Boolean(live && live.cancelWanted) || Boolean(!live && state.pending && state.pending.cancelWanted);
    ui.app.dataset.busy = busy ? "true" : "false";
  }

  function autoGrow() {
    ui.input.style.height = "auto";
    ui.input.style.height = `${Math.min(ui.input.scrollHeight + 2, window.innerHeight * 0.4)}px`;
  }

  function submit() {
    const text = ui.input.value.trim();
    if (!text || liveTurn() || state.pending || !state.credential) return;
    const clientTurnId = newId();
    const entry = makeEntry("c:" + clientTurnId, "user");
    entry.text = text;
    entry.status = "sending";
    entry.clientTurnId = clientTurnId;
    entry.createdAt = Date.now();
    state.pending = { clientTurnId, text, entry, retries: 0, retryTimer: 0, cancelWanted: false, failed: false };
    state.entries.push(entry);
    paint(entry);
    ui.input.value = "";
    autoGrow();
    render({ stick: true });
    sendStart();
  }

  function sendStart() {
    const p = state.pending;
    if (!p || p.failed || !state.ready) return;
    send({ type: "turn.start", client_turn_id: p.clientTurnId, text: p.text,
           conversation_id: state.conversation });
    paint(p.entry);
  }

  function retryPending(p) {
    if (liveTurn() || (state.pending && state.pending !== p)) {
      showNotice("Wait for the current reply to finish first.", 4000);
      return;
    }
    clearTimeout(p.retryTimer);
    p.failed = false;
    p.entry.status = "sending";
    state.pending = p;
    if (state.entries.indexOf(p.entry) < 0) state.entries.push(p.entry);
    setEntryError(p.entry, "");
    render({ stick: true });
    sendStart();
  }

  function stop() {
    const live = liveTurn();
    if (live) {
      live.cancelWanted = true;
      sendCancel(live);
    } else if (state.pending) {
      state.pending.cancelWanted = true;   // cancel as soon as it is accepted
    }
    updateComposer();
  }

  function sendCancel(turn) {
    if (!turn.cancelWanted || turn.ended || !state.ready) return;
    send({ type: "turn.cancel", turn_id: turn.turnId });
    turn.cancelSent = true;
  }

  // ------------------------------------------------------------------ connection

  function send(frame) {
    const ws = state.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) return false;
    ws.send(JSON.stringify(frame));
    return true;
  }

  function connect() {
    clearTimeout(state.reconnectTimer);
    clearInterval(state.countdownTimer);
    if (state.ws || !state.credential) return;
    state.stopped = false;
    setStatus(state.attempt === 0 && state.connects === 0 ? "connecting" : "reconnecting",
              state.connects === 0 ? "Connecting…" : "Reconnecting…");
    let ws;
    try {
      ws = new WebSocket(wsUrl(), [SUBPROTOCOL]);
    } catch (err) {
      scheduleReconnect();
      return;
    }
    state.ws = ws;
    state.ready = false;
    state.historyQueue = [];
    state.openTimer = setTimeout(() => dropSocket(ws, "timeout"), OPEN_TIMEOUT_MS);
    ws.addEventListener("open", () => {
      if (state.ws !== ws) return;
      state.lastRx = Date.now();
      // coalesce: a lagging socket may receive merged deltas (seq_start..seq); servers without it ignore it.
      const hello = { type: "hello", client: { name: "rapport-web", version: "1" }, coalesce: true };
      if (state.credential.token) hello.token = state.credential.token;
      else hello.user = state.credential.user;
      send(hello);
    });
    ws.addEventListener("message", (ev) => {
      if (state.ws !== ws) return;
      state.lastRx = Date.now();
      let frame;
      try { frame = JSON.parse(ev.data); } catch { return; }
      if (frame && typeof frame.type === "string") onFrame(frame);
    });
    ws.addEventListener("close", (ev) => {
      if (state.ws === ws) onClosed(ev.code, ev.reason);
    });
    // "error" is always followed by "close".
  }

  // Give up on a socket at once (dead or timed out) without waiting for its close handshake.
  function dropSocket(ws, why) {
    if (state.ws !== ws) return;
    try { ws.close(4000, why); } catch { /* already closing */ }
    onClosed(1006, why);
  }

  function onClosed(code) {
    const wasReady = state.ready;
    clearTimeout(state.openTimer);
    clearInterval(state.pingTimer);
    clearInterval(state.watchdogTimer);
    state.ws = null;
    state.ready = false;
    for (const turn of state.turns.values()) turn.resumeSent = false;
    if (state.pending) paint(state.pending.entry);
    if (code === 4401) {
      state.stopped = true;
      setStatus("unauthorized", "Sign-in refused");
      signOut(state.config && state.config.auth === "jwt"
        ? "The server did not accept this token. Paste a new one."
        : "The server refused this name.");
      return;
    }
    if (state.stopped) return;
    if (code === 4429) showNotice("Too many open connections for this user; retrying.", 6000);
    if (wasReady) state.attempt = 0;
    scheduleReconnect();
  }

  function scheduleReconnect() {
    if (state.stopped) return;
    // Exponential backoff with full jitter: uniform in [0, min(cap, base * 2^attempt)].
    const ceiling = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** state.attempt);
    const delay = Math.random() * ceiling;
    state.attempt += 1;
    state.reconnectAt = Date.now() + delay;
    const tick = () => {
      const left = state.reconnectAt - Date.now();
      setStatus("reconnecting", `Reconnecting in ${seconds(left)}s`);
    };
    tick();
    clearInterval(state.countdownTimer);
    state.countdownTimer = setInterval(tick, 250);
    clearTimeout(state.reconnectTimer);
    state.reconnectTimer = setTimeout(connect, delay);
  }

  function reconnectNow() {
    if (!state.ws && !state.stopped && state.credential) connect();
  }

  function startHeartbeat(hb) {
    state.heartbeat = {
      interval_ms: Number(hb && hb.interval_ms) > 0 ? Number(hb.interval_ms) : DEFAULT_HEARTBEAT.interval_ms,
      timeout_ms: Number(hb && hb.timeout_ms) > 0 ? Number(hb.timeout_ms) : DEFAULT_HEARTBEAT.timeout_ms,
    };
    const ws = state.ws;
    clearInterval(state.pingTimer);
    clearInterval(state.watchdogTimer);
    state.pingTimer = setInterval(() => send({ type: "ping", t: Date.now() }), state.heartbeat.interval_ms);
    const deadAfter = state.heartbeat.interval_ms + state.heartbeat.timeout_ms;
    state.watchdogTimer = setInterval(() => {
      if (Date.now() - state.lastRx > deadAfter) dropSocket(ws, "heartbeat");
    }, Math.min(1000, deadAfter / 4));
  }

  // ------------------------------------------------------------------ frames

  function onFrame(f) {
    switch (f.type) {
      case "ready": return onReady(f);
      case "turn.accepted": return onAccepted(f);
      case "turn.delta": return onDelta(f);
      case "turn.end": return onEnd(f);
      case "history": return onHistory(f);
      case "history.cleared": return onCleared(f);
      case "error": return onError(f);
      case "ping": send({ type: "pong", t: f.t }); return;
      case "pong": return;
      default: return; // unknown frames are ignored
    }
  }

  function onReady(f) {
    clearTimeout(state.openTimer);
    state.ready = true;
    state.attempt = 0;
    state.connects += 1;
    ui.status.dataset.sessionId = f.session_id || "";
    setStatus("connected", "Connected");
    if (f.model) showModel(f.model);
    ui.whoami.textContent = f.user_id ? `Signed in as ${f.user_id}` : "";
    startHeartbeat(f.heartbeat);
    // Order matters: the server answers frames one by one, so the un-accepted
    // turn.start's accepted frame arrives before the history, and the history
    // before we resume active turns we did not know about.
    sendStart();
    for (const turn of state.turns.values()) resume(turn);
    requestHistory("latest");
    state.activeAtReady = Array.isArray(f.active_turns) ? f.active_turns : [];
    for (const turn of state.turns.values()) sendCancel(turn);
    if (state.pending) paint(state.pending.entry);
    hideNotice();
    updateComposer();
  }

  function resume(turn) {
    if (turn.ended || turn.resumeSent || !state.ready) return;
    turn.resumeSent = true;
    send({ type: "turn.resume", turn_id: turn.turnId, after_seq: turn.lastSeq });
  }

  function requestHistory(kind) {
    const frame = { type: "history.get", conversation_id: state.conversation, limit: HISTORY_LIMIT };
    if (kind === "older") {
      const before = oldestId();
      if (!before) return;
      frame.before = before;
    }
    if (send(frame)) state.historyQueue.push(kind);
  }

  function onAccepted(f) {
    const p = state.pending;
    const turn = trackTurn(f.turn_id);
    turn.resumeSent = true; // the server streams this turn to us already
    if (p && p.clientTurnId === f.client_turn_id) {
      state.pending = null;
      clearTimeout(p.retryTimer);
      const existing = indexOfKey("u:" + f.turn_id);
      if (existing >= 0) {
        // The history already shows this message (it was accepted before a drop).
        state.entries.splice(state.entries.indexOf(p.entry), 1);
      } else {
        p.entry.key = "u:" + f.turn_id;
        p.entry.turnId = f.turn_id;
        p.entry.status = "sent";
        paint(p.entry);
      }
      if (p.cancelWanted) turn.cancelWanted = true;
    }
    placeReply(turn);
    render({ stick: true });
    sendCancel(turn);
  }

  function onDelta(f) {
    const turn = trackTurn(f.turn_id);
    const seq = Number(f.seq);
    // A lagging socket may get consecutive deltas merged into one frame covering seq_start..seq.
    const first = f.seq_start === undefined ? seq : Number(f.seq_start);
    if (turn.ended || !(seq > turn.lastSeq)) return;           // already held
    if (first !== turn.lastSeq + 1) {                            // a gap (or a partial overlap we
      // cannot split): ask for what is missing; seqs already held are ignored.
      if (turn.gapAt !== turn.lastSeq) {
        turn.gapAt = turn.lastSeq;
        send({ type: "turn.resume", turn_id: turn.turnId, after_seq: turn.lastSeq });
      }
      return;
    }
    const stick = nearBottom();
    turn.lastSeq = seq;
    turn.text += typeof f.text === "string" ? f.text : "";
    const entry = turn.entry;
    entry.text = turn.text;
    entry.status = "streaming";
    if (state.entries.indexOf(entry) < 0) {
      placeReply(turn);
      render({ stick });
    }
    paint(entry);
    entry.node.dataset.seq = String(seq);
    if (stick) scrollToBottom();
    updateComposer();
  }

  function finishTurn(turn, reason, text, seq) {
    const stick = nearBottom();
    if (typeof text === "string" && text !== turn.text) {
      // The deltas held do not add up to the final text: show the server's text.
      if (turn.text) {
        turn.repaired = true;
        turn.entry.node.dataset.repaired = "true";
        console.warn("rapport: reply text repaired from turn.end", turn.turnId);
      }
      turn.text = text;
    }
    if (Number.isFinite(Number(seq))) turn.lastSeq = Math.max(turn.lastSeq, Number(seq));
    turn.ended = true;
    turn.finishReason = reason || "stop";
    const entry = turn.entry;
    entry.text = turn.text;
    entry.status = turn.finishReason;
    if (state.entries.indexOf(entry) < 0) placeReply(turn);
    paint(entry);
    render({ stick });
  }

  function onEnd(f) {
    const turn = trackTurn(f.turn_id);
    if (turn.ended) return;
    finishTurn(turn, f.finish_reason, f.text, f.seq);
  }

  function historyEntry(m) {
    const key = m.turn_id ? (m.role === "user" ? "u:" : "a:") + m.turn_id : "m:" + m.id;
    let entry = null;
    if (m.role === "assistant" && m.turn_id && state.turns.has(m.turn_id)) {
      const turn = state.turns.get(m.turn_id);
      if (!turn.ended) finishTurn(turn, m.status, m.text, null);
      entry = turn.entry;
    } else {
      entry = state.entries.find((e) => e.key === key) || makeEntry(key, m.role === "user" ? "user" : "assistant");
      entry.text = typeof m.text === "string" ? m.text : "";
      entry.status = m.role === "user" ? "sent" : (m.status || "stop");
    }
    entry.id = m.id || "";
    entry.turnId = m.turn_id || "";
    entry.createdAt = Number(m.created_at) || 0;
    paint(entry);
    return entry;
  }

  function onHistory(f) {
    const kind = state.historyQueue.shift() || "latest";
    if (f.conversation_id && f.conversation_id !== state.conversation) return;
    const messages = Array.isArray(f.messages) ? f.messages : [];
    if (kind === "older") {
      const before = ui.scroller.scrollHeight - ui.scroller.scrollTop;
      const fresh = messages.map(historyEntry).filter((e) => state.entries.indexOf(e) < 0);
      state.entries = [...fresh, ...state.entries];
      state.hasOlder = messages.length >= HISTORY_LIMIT;
      render({ stick: false });
      ui.scroller.scrollTop = ui.scroller.scrollHeight - before;
      return;
    }
    const firstLoad = !state.historyLoaded;
    const stick = firstLoad || nearBottom();
    const page = messages.map(historyEntry);
    const firstId = page.length ? page[0].id : "";
    // Earlier pages the user loaded stay in front of the newest page.
    const kept = state.entries.filter((e) => e.id && firstId && compareIds(e.id, firstId) < 0 && page.indexOf(e) < 0);
    state.entries = [...kept, ...page];
    if (firstLoad || !kept.length) state.hasOlder = messages.length >= HISTORY_LIMIT;
    // Replies this page follows that the history does not show (yet): keep them.
    for (const turn of state.turns.values()) {
      if (state.entries.indexOf(turn.entry) >= 0) continue;
      if (indexOfKey("u:" + turn.turnId) >= 0 || !turn.ended) placeReply(turn);
    }
    if (state.pending && state.entries.indexOf(state.pending.entry) < 0) state.entries.push(state.pending.entry);
    state.historyLoaded = true;
    render({ stick });
    // Turns running for this user that the page did not follow yet (e.g. after a reload).
    const active = state.activeAtReady;
    state.activeAtReady = null;
    if (active) {
      for (const a of active) {
        if (!a || !a.turn_id || (a.conversation_id && a.conversation_id !== state.conversation)) continue;
        const turn = trackTurn(a.turn_id);
        if (state.entries.indexOf(turn.entry) < 0) { placeReply(turn); render({ stick }); }
        resume(turn);
      }
    }
  }

  function onCleared(f) {
    if (f.conversation_id && f.conversation_id !== state.conversation) return;
    for (const [id, turn] of state.turns) if (turn.ended) state.turns.delete(id);
    state.entries = state.entries.filter((e) =>
      (state.pending && e === state.pending.entry) ||
      [...state.turns.values()].some((t) => t.entry === e || e.key === "u:" + t.turnId));
    state.hasOlder = false;
    render({ stick: true });
  }

  const ERROR_TEXT = {
    busy: "The companion is busy right now.",
    rate_limited: "You're sending messages too quickly.",
    turn_in_progress: "A reply is still being written. Send again when it's done.",
    too_large: "That message is too long.",
    bad_request: "The server could not read that message.",
    unavailable: "The service is briefly unavailable.",
    internal: "Something went wrong on the server.",
    unauthorized: "Not signed in.",
    not_found: "That reply no longer exists.",
    resume_expired: "That reply can no longer be resumed.",
  };

  function onError(f) {
    const code = String(f.code || "internal");
    const text = ERROR_TEXT[code] || (typeof f.message === "string" ? f.message : "Error");
    const p = state.pending;
    if (f.client_turn_id && p && f.client_turn_id === p.clientTurnId) return rejectPending(p, code, text, f);
    const turn = f.turn_id ? state.turns.get(f.turn_id) : null;
    if (turn) {
      if (code === "resume_expired") {
        finishTurn(turn, f.finish_reason || "interrupted", typeof f.text === "string" ? f.text : turn.text, null);
      } else if (code === "not_found") {
        finishTurn(turn, "interrupted", turn.text, null);
      } else if (!turn.ended && (code === "unavailable" || code === "internal")) {
        // Following failed: try again shortly while the socket is up.
        turn.resumeSent = false;
        setTimeout(() => resume(turn), 1000);
      } else {
        showNotice(`${text}`, 6000);
      }
      return;
    }
    showNotice(typeof f.message === "string" && f.message ? `${text} (${f.message})` : text, 8000);
  }

  function rejectPending(p, code, text, f) {
    clearTimeout(p.retryTimer);
    const wait = Number(f.retry_after_ms);
    if ((code === "busy" || code === "rate_limited" || code === "unavailable") && p.retries < AUTO_RETRIES) {
      // Not accepted, so sending the same client_turn_id again later is safe.
      p.retries += 1;
      const delay = Number.isFinite(wait) && wait > 0 ? wait : 1000 * p.retries;
      const until = Date.now() + delay;
      const tick = () => {
        if (state.pending !== p) return;
        setEntryError(p.entry, `${text} Retrying in ${seconds(until - Date.now())}s…`);
      };
      tick();
      const countdown = setInterval(tick, 500);
      p.retryTimer = setTimeout(() => {
        clearInterval(countdown);
        if (state.pending !== p) return;
        setEntryError(p.entry, "");
        sendStart();
      }, delay);
      return;
    }
    p.failed = true;
    state.pending = null;
    p.entry.status = "failed";
    let detail = text;
    if (Number.isFinite(wait) && wait > 0) detail += ` Try again in ${seconds(wait)}s.`;
    const retryable = code !== "bad_request" && code !== "too_large";
    setEntryError(p.entry, detail, retryable ? () => retryPending(p) : null);
    if (code === "turn_in_progress" && f.turn_id && !state.turns.has(f.turn_id)) {
      // Show the reply that is running (e.g. started in another tab).
      const turn = trackTurn(f.turn_id);
      requestHistory("latest");
      resume(turn);
    }
    if (code === "too_large" || code === "bad_request") {
      if (!ui.input.value) ui.input.value = p.text;
      autoGrow();
    }
    render();
  }

  // ------------------------------------------------------------------ sign-in

  function showSignIn(message) {
    const jwt = state.config && state.config.auth === "jwt";
    ui.signinLabel.textContent = jwt ? "Access token" : "Your name";
    ui.signinHelp.textContent = jwt
      ? "Paste the access token your app gave you. It stays on this device."
      : "Development mode: pick any name. Your conversation is kept under it.";
    ui.signinValue.type = jwt ? "password" : "text";
    ui.signinValue.autocomplete = jwt ? "off" : "username";
    ui.signinValue.placeholder = jwt ? "eyJhbGciOi…" : "e.g. alex";
    ui.signinValue.value = "";
    ui.signinError.textContent = message || "";
    ui.signinError.hidden = !message;
    ui.signin.hidden = false;
    setTimeout(() => ui.signinValue.focus(), 0);
  }

  function signIn(value) {
    const jwt = state.config.auth === "jwt";
    value = value.trim();
    if (!value) return;
    if (jwt) { storage.set(KEYS.token, value); state.credential = { token: value }; }
    else { storage.set(KEYS.user, value); state.credential = { user: value }; }
    ui.signin.hidden = true;
    state.attempt = 0;
    connect();
    updateComposer();
    ui.input.focus();
  }

  function resetThread() {
    state.entries = [];
    state.turns.clear();
    if (state.pending) clearTimeout(state.pending.retryTimer);
    state.pending = null;
    state.historyLoaded = false;
    state.hasOlder = false;
    render();
  }

  function signOut(message) {
    state.stopped = true;
    clearTimeout(state.reconnectTimer);
    clearInterval(state.countdownTimer);
    const ws = state.ws;
    if (ws) {
      state.ws = null;
      state.ready = false;
      clearInterval(state.pingTimer);
      clearInterval(state.watchdogTimer);
      try { ws.close(1000, "sign out"); } catch { /* closing */ }
    }
    storage.remove(state.config && state.config.auth === "jwt" ? KEYS.token : KEYS.user);
    state.credential = null;
    resetThread();
    if (!message) setStatus("signed-out", "Signed out");
    showSignIn(message);
  }

  // ------------------------------------------------------------------ start-up

  async function loadConfig() {
    let attempt = 0;
    for (;;) {
      try {
        const res = await fetch("/v1/page-config", { cache: "no-store", credentials: "same-origin" });
        if (res.ok) return await res.json();
      } catch { /* offline: retry */ }
      const delay = Math.random() * Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** attempt);
      attempt += 1;
      setStatus("offline", `Offline, retrying in ${seconds(delay)}s`);
      await new Promise((r) => setTimeout(r, delay));
    }
  }

  function credentialFromHash() {
    // Apps may open the page as /#token=... (or /#user=... in development mode).
    const hash = window.location.hash.replace(/^#/, "");
    if (!hash) return;
    const params = new URLSearchParams(hash);
    const token = params.get("token");
    const user = params.get("user");
    if (token) storage.set(KEYS.token, token);
    if (user) storage.set(KEYS.user, user);
    if (token || user) window.history.replaceState(null, "", window.location.pathname + window.location.search);
  }

  function bind() {
    ui.form.addEventListener("submit", (ev) => { ev.preventDefault(); submit(); });
    ui.input.addEventListener("input", () => { autoGrow(); updateComposer(); });
    ui.input.addEventListener("keydown", (ev) => {
      const coarse = window.matchMedia && window.matchMedia("(pointer: coarse)").matches;
      if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing && !coarse) {
        ev.preventDefault();
        submit();
      }
    });
    ui.stop.addEventListener("click", stop);
    ui.older.addEventListener("click", () => requestHistory("older"));
    ui.status.addEventListener("click", reconnectNow);
    ui.menuButton.addEventListener("click", (ev) => {
      ev.stopPropagation();
      const open = ui.menu.hidden;
      ui.menu.hidden = !open;
      ui.menuButton.setAttribute("aria-expanded", String(open));
    });
    document.addEventListener("click", (ev) => {
      if (!ui.menu.hidden && !ui.menu.contains(ev.target)) {
        ui.menu.hidden = true;
        ui.menuButton.setAttribute("aria-expanded", "false");
      }
    });
    ui.clear.addEventListener("click", () => {
      ui.menu.hidden = true;
      if (!state.ready) { showNotice("Not connected.", 3000); return; }
      if (window.confirm("Clear this conversation? This cannot be undone.")) {
        send({ type: "history.clear", conversation_id: state.conversation });
      }
    });
    ui.signout.addEventListener("click", () => { ui.menu.hidden = true; signOut(); });
    ui.signinForm.addEventListener("submit", (ev) => { ev.preventDefault(); signIn(ui.signinValue.value); });
    window.addEventListener("online", reconnectNow);
    document.addEventListener("visibilitychange", () => { if (!document.hidden) reconnectNow(); });
  }

  async function main() {
    bind();
    credentialFromHash();
    setStatus("connecting", "Connecting…");
    state.config = await loadConfig();
    state.conversation = state.config.conversation_id || "default";
    if (state.config.model) showModel(state.config.model);
    if (Number(state.config.max_input_chars) > 0) ui.input.maxLength = Number(state.config.max_input_chars);
    const jwt = state.config.auth === "jwt";
    const stored = storage.get(jwt ? KEYS.token : KEYS.user);
    if (stored) state.credential = jwt ? { token: stored } : { user: stored };
    if (!state.credential) {
      setStatus("signed-out", "Not signed in");
      showSignIn("");
      return;
    }
    connect();
  }

  main();
})();
