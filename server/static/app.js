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
 * And, from the additions to the protocol (docs/protocol.md, 18-21):
 *   - a token in the URL fragment (#token=..., the development sign-in link) is
 *     kept in localStorage and removed from the address bar; it goes in
 *     hello.token and as the Bearer of the REST calls;
 *   - characters: GET /v1/characters for the picker, POST /v1/conversations to
 *     start a conversation with one (its greeting is the first message);
 *   - swipes: the replies to one user message (an exchange) are alternatives;
 *     the page shows the selected one with < i/n > controls (turn.select),
 *     asks for another with turn.regenerate (an ordinary turn: accepted,
 *     deltas, end, resumable), and rewrites the last message with turn.edit;
 *   - feedback: thumbs up/down send `feedback`, highlighted once recorded.
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
  const KEYS = { user: "rapport.user", token: "rapport.token", conversation: "rapport.conversation",
                 conversationCharacters: "rapport.conversation-characters" };
  const REMEMBERED_CONVERSATIONS = 50;
  const RECENT_CONVERSATIONS = 8;

  const $ = (id) => document.getElementById(id);
  const ui = {
    app: $("app"),
    status: $("status"),
    statusText: $("status-text"),
    model: $("model"),
    title: $("title"),
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
    newChat: $("new-chat"),
    picker: $("picker"),
    pickerForm: $("picker-form"),
    pickerList: $("character-list"),
    pickerNote: $("picker-note"),
    recentTitle: $("recent-title"),
    recentList: $("conversation-list"),
    pickerStart: $("picker-start"),
    pickerCancel: $("picker-cancel"),
    editBanner: $("edit-banner"),
    editCancel: $("edit-cancel"),
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
    pending: null,           // the user's turn.start (or regenerate/edit) not yet accepted
    selected: new Map(),     // exchange_id -> turn_id of the alternative shown (and the model sees)
    characters: new Map(),   // character id -> summary {id, name, description, ...}
    charactersLoaded: false,
    characterId: "",         // the current conversation's character, if any
    chosenCharacter: null,   // the picker's choice: an id, or "" for none
    editing: null,           // {exchangeId, entry}: the composer rewrites this message (turn.edit)
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

  // An entry is one bubble: {key, role, text, status, turnId, id, createdAt, node, bubble, meta, error},
  // plus its exchange (exchangeId, alternative) and, for a reply, its rating.
  function makeEntry(key, role) {
    const node = el("li", `msg ${role}`);
    const bubble = el("div", "bubble");
    const meta = el("div", "meta");
    const actions = el("div", "actions");
    node.append(bubble, meta, actions);
    return { key, role, text: "", status: "", turnId: "", id: "", createdAt: 0,
             node, bubble, meta, actions, actionsSig: "", error: null, shown: null,
             exchangeId: "", alternative: -1, alternatives: 0, rating: 0, ratingWanted: 0 };
  }

  const MARKERS = {
    cancelled: "Stopped",
    interrupted: "Interrupted",
    length: "Cut short",
    budget_exceeded: "Timed out",
    error: "Failed",
    failed: "Not sent",
    content_filter: "Filtered",
  };
  const MARKER_HINTS = {
    content_filter: "The rest of this reply was held back by the content filter.",
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
      if (MARKER_HINTS[entry.status]) m.title = MARKER_HINTS[entry.status];
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
    paintExchanges();
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

  // Where a turn's reply bubble belongs: right after its user message and the
  // exchange's earlier alternatives, else at the end (but before a message still
  // waiting to be accepted).
  function placeReply(turn) {
    const at = state.entries.indexOf(turn.entry);
    if (at >= 0) state.entries.splice(at, 1);
    const exchange = turn.entry.exchangeId || turn.turnId;
    let after = -1;
    state.entries.forEach((e, i) => {
      if (e.key === "u:" + exchange || (e.role === "assistant" && e.exchangeId === exchange)) after = i;
    });
    if (after >= 0) {
      state.entries.splice(after + 1, 0, turn.entry);
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
      // Until told otherwise (turn.accepted, history), a reply is the first of its own exchange.
      if (!entry.exchangeId) entry.exchangeId = turnId;
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

  function busy() { return Boolean(liveTurn() || state.pending); }

  // ------------------------------------------------------------------ exchanges, swipes, ratings

  // The replies of each exchange, in thread order (oldest alternative first).
  function exchangeGroups() {
    const groups = new Map();
    for (const e of state.entries) {
      if (e.role !== "assistant" || !e.exchangeId || !e.turnId) continue;
      const group = groups.get(e.exchangeId);
      if (group) group.push(e); else groups.set(e.exchangeId, [e]);
    }
    return groups;
  }

  // The newest exchange: the one of the last user message the server accepted.
  function newestExchange() {
    for (let i = state.entries.length - 1; i >= 0; i--) {
      const e = state.entries[i];
      if (e.role === "user") return e.key.startsWith("u:") ? (e.exchangeId || e.turnId) : "";
    }
    return "";
  }

  function shownAlternative(exchangeId, group) {
    const live = group.find((e) => !ended(e));
    if (live) return live; // a reply on its way is always the one shown
    const wanted = state.selected.get(exchangeId);
    return group.find((e) => e.turnId === wanted) || group[group.length - 1];
  }

  // A reply of this exchange still being written: history does not hold it yet, so the
  // selection it reports is older than the page's (the newest reply is selected by default).
  function writingIn(exchangeId) {
    for (const turn of state.turns.values()) if (!turn.ended && turn.entry.exchangeId === exchangeId) return true;
    return false;
  }

  function ended(entry) { return entry.status !== "waiting" && entry.status !== "streaming"; }

  // Shows one alternative per exchange and gives replies their controls.
  function paintExchanges() {
    const groups = exchangeGroups();
    const newest = newestExchange();
    const idle = !busy() && state.ready;
    const visible = new Set();
    for (const [exchangeId, group] of groups) {
      const shown = shownAlternative(exchangeId, group);
      const at = group.indexOf(shown);
      for (const e of group) {
        e.node.hidden = e !== shown;
        if (e !== shown) paintActions(e, null);
      }
      visible.add(shown);
      const isNewest = exchangeId === newest;
      const total = Math.max(group.length, ...group.map((e) => e.alternatives || 0));
      paintActions(shown, {
        exchangeId, group, at, total, idle,
        canRegenerate: isNewest && ended(shown) && Boolean(state.credential),
      });
    }
    for (const e of state.entries) {
      if (e.role === "assistant" && !visible.has(e) && !(e.turnId && groups.has(e.exchangeId))) {
        e.node.hidden = false;
        paintActions(e, null);
      }
      if (e.role === "user") paintUserActions(e, newest, !busy() && state.ready);
    }
  }

  // Line icons drawn in the page (no emoji font or image needed): 24x24 paths.
  const ICONS = {
    prev: "M15 5l-7 7 7 7",
    next: "M9 5l7 7-7 7",
    regenerate: "M20 12a8 8 0 1 1-2.34-5.66M20 4v5h-5",
    up: "M7 11v9H4v-9zM7 11l4-8a2.5 2.5 0 0 1 2.5 2.5V9h5.2a2 2 0 0 1 2 2.3l-1.2 7a2 2 0 0 1-2 1.7H7",
    down: "M7 13V4H4v9zM7 13l4 8a2.5 2.5 0 0 0 2.5-2.5V15h5.2a2 2 0 0 0 2-2.3l-1.2-7a2 2 0 0 0-2-1.7H7",
    edit: "M4 20h4L19 9l-4-4L4 16zM13.5 6.5l4 4",
  };

  function icon(name) {
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", "0 0 24 24");
    svg.setAttribute("width", "20");
    svg.setAttribute("height", "20");
    svg.setAttribute("aria-hidden", "true");
    svg.setAttribute("class", "icon");
    const path = document.createElementNS(ns, "path");
    path.setAttribute("d", ICONS[name]);
    svg.append(path);
    return svg;
  }

  function iconButton(className, label, iconName, onClick, opts = {}) {
    const b = el("button", `act ${className}`);
    b.append(icon(iconName));
    b.type = "button";
    b.setAttribute("aria-label", label);
    b.title = label;
    if (opts.pressed !== undefined) b.setAttribute("aria-pressed", String(opts.pressed));
    if (opts.disabled) b.disabled = true;
    b.addEventListener("click", onClick);
    return b;
  }

  // The controls under a reply: < i/n > and regenerate on the exchange, thumbs on the reply.
  function paintActions(entry, info) {
    const n = entry.node;
    if (info) {
      n.dataset.exchangeId = info.exchangeId;
      n.dataset.alternative = String(info.at);
    }
    const rateable = Boolean(info && entry.turnId && ended(entry) && entry.status !== "greeting");
    const sig = info ? [info.at, info.total, info.idle, info.canRegenerate, rateable, entry.rating,
                        entry.ratingWanted, entry.status].join("|") : "";
    if (sig === entry.actionsSig) return;
    entry.actionsSig = sig;
    n.dataset.rating = entry.rating ? String(entry.rating) : "";
    entry.actions.replaceChildren();
    if (!info) return;
    const { group, at, total, idle, canRegenerate } = info;
    if (total > 1) {
      const nav = el("div", "swipes");
      nav.setAttribute("role", "group");
      nav.setAttribute("aria-label", "Alternative replies");
      nav.append(iconButton("swipe-prev", "Previous reply", "prev", () => selectAlternative(group[at - 1]),
                            { disabled: !idle || at <= 0 }));
      const count = el("span", "swipe-count", `${at + 1}/${total}`);
      count.setAttribute("aria-label", `Reply ${at + 1} of ${total}`);
      nav.append(count);
      const last = at >= group.length - 1;
      nav.append(last
        ? iconButton("swipe-next", "Another reply", "next", () => regenerate(info.exchangeId),
                     { disabled: !idle || !canRegenerate })
        : iconButton("swipe-next", "Next reply", "next", () => selectAlternative(group[at + 1]),
                     { disabled: !idle }));
      entry.actions.append(nav);
    }
    if (canRegenerate) {
      entry.actions.append(iconButton("regenerate", "Regenerate reply", "regenerate",
                                      () => regenerate(info.exchangeId), { disabled: !idle }));
    }
    if (rateable) {
      const shownRating = entry.ratingWanted || entry.rating;
      const up = iconButton("rate-up", "Good reply", "up", () => rate(entry, 1),
                            { pressed: shownRating === 1, disabled: !state.ready });
      const down = iconButton("rate-down", "Bad reply", "down", () => rate(entry, -1),
                              { pressed: shownRating === -1, disabled: !state.ready });
      if (entry.ratingWanted) (entry.ratingWanted === 1 ? up : down).dataset.saving = "true";
      entry.actions.append(up, down);
    }
  }

  function paintUserActions(entry, newest, idle) {
    const editable = idle && entry.key.startsWith("u:") && (entry.exchangeId || entry.turnId) === newest &&
      !state.editing;
    const sig = editable ? "edit" : "";
    if (sig === entry.actionsSig) return;
    entry.actionsSig = sig;
    entry.actions.replaceChildren();
    if (editable) {
      entry.actions.append(iconButton("edit", "Edit your message", "edit", () => startEdit(entry)));
    }
  }

  function selectAlternative(target) {
    if (!target || !target.turnId || busy()) return;
    state.selected.set(target.exchangeId, target.turnId);
    send({ type: "turn.select", conversation_id: state.conversation, turn_id: target.turnId });
    target.node.dataset.selectPending = "true";
    render();
  }

  function onSelected(f) {
    if (f.conversation_id && f.conversation_id !== state.conversation) return;
    if (f.exchange_id && f.turn_id) state.selected.set(f.exchange_id, f.turn_id);
    const entry = state.entries.find((e) => e.key === "a:" + f.turn_id);
    if (entry) delete entry.node.dataset.selectPending;
    render();
  }

  function regenerate(exchangeId) {
    if (!exchangeId || busy() || !state.credential) return;
    const clientTurnId = newId();
    state.pending = { kind: "regenerate", clientTurnId, text: "", entry: null, exchangeId,
                      retries: 0, retryTimer: 0, cancelWanted: false, failed: false };
    render({ stick: true });
    sendStart();
  }

  function rate(entry, rating) {
    if (!entry.turnId || !state.ready || entry.rating === rating && !entry.ratingWanted) return;
    entry.ratingWanted = rating;
    send({ type: "feedback", turn_id: entry.turnId, rating });
    render();
  }

  function onFeedbackRecorded(f) {
    const entry = state.entries.find((e) => e.key === "a:" + f.turn_id);
    if (!entry) return;
    entry.rating = Number(f.rating) || 0;
    if (entry.ratingWanted === entry.rating) entry.ratingWanted = 0;
    render();
  }

  // ------------------------------------------------------------------ editing the last message

  function startEdit(entry) {
    if (busy()) return;
    state.editing = { exchangeId: entry.exchangeId || entry.turnId, entry };
    ui.input.value = entry.text;
    ui.editBanner.hidden = false;
    autoGrow();
    render();
    ui.input.focus();
  }

  function cancelEdit() {
    if (!state.editing) return;
    state.editing = null;
    ui.editBanner.hidden = true;
    ui.input.value = "";
    autoGrow();
    render();
  }

  // turn.edit was accepted: the old message and its replies are gone from the conversation.
  function dropExchange(exchangeId) {
    state.entries = state.entries.filter((e) => {
      const gone = e.key === "u:" + exchangeId || (e.role === "assistant" && e.exchangeId === exchangeId);
      if (gone && e.turnId) state.turns.delete(e.turnId);
      return !gone;
    });
    state.selected.delete(exchangeId);
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
    if (memoryCommand(text)) return;
    if (!text || liveTurn() || state.pending || !state.credential) return;
    const clientTurnId = newId();
    const entry = makeEntry("c:" + clientTurnId, "user");
    entry.text = text;
    entry.status = "sending";
    entry.clientTurnId = clientTurnId;
    entry.createdAt = Date.now();
    const editing = state.editing;
    state.pending = { kind: editing ? "edit" : "start", clientTurnId, text, entry,
                      exchangeId: editing ? editing.exchangeId : "",
                      retries: 0, retryTimer: 0, cancelWanted: false, failed: false };
    if (editing) {
      state.editing = null;
      ui.editBanner.hidden = true;
    }
    state.entries.push(entry);
    paint(entry);
    ui.input.value = "";
    autoGrow();
    render({ stick: true });
    sendStart();
  }

  // Pinned facts (addition 22): "/remember <text>" sends memory.add instead of a message and
  // "/memory" asks for the list; the answer (a `memory` frame, always the whole list) is
  // shown as a notice. The box keeps the command until the answer comes, so a refused fact
  // (bad_request, content_filter: shown as any error) can be edited. True when handled here.
  function memoryCommand(text) {
    const m = /^\/(remember|memory)(?:\s+([\s\S]*))?$/.exec(text);
    if (!m || !state.credential) return false;
    const rest = (m[2] || "").trim();
    if (m[1] === "memory" && rest) return false; // not the command: an ordinary message
    if (m[1] === "remember" && !rest) {
      showNotice("Type what to remember after /remember.", 4000);
      return true;
    }
    const frame = m[1] === "remember" ? { type: "memory.add", text: rest } : { type: "memory.list" };
    if (!state.ready || !send(frame)) {
      showNotice("Not connected; try again in a moment.", 4000);
      return true;
    }
    state.memoryWanted = { kind: m[1], text };
    return true;
  }

  function onMemory(f) {
    const facts = Array.isArray(f.facts) ? f.facts : [];
    const wanted = state.memoryWanted;
    state.memoryWanted = null;
    if (wanted && ui.input.value.trim() === wanted.text) {
      ui.input.value = "";
      autoGrow();
      updateComposer();
    }
    const count = `${facts.length} pinned fact${facts.length === 1 ? "" : "s"}`;
    if (wanted && wanted.kind === "remember") {
      showNotice(`Remembered. ${count}; /memory lists them.`, 5000);
    } else {
      showNotice(facts.length ? `${count}: ${facts.map((x) => `“${x.text}”`).join(" · ")}`
                              : "Nothing pinned yet: /remember <text> pins a fact.", 10000);
    }
  }

  // Sends the turn not accepted yet: turn.start, or turn.regenerate / turn.edit (addition 19),
  // always with the same client_turn_id, so a repeat after a reconnect is replayed, not doubled.
  function sendStart() {
    const p = state.pending;
    if (!p || p.failed || !state.ready) return;
    const frame = { type: p.kind === "start" ? "turn.start" : `turn.${p.kind}`,
                    client_turn_id: p.clientTurnId, conversation_id: state.conversation };
    if (p.kind !== "regenerate") frame.text = p.text;
    if (p.kind !== "start") frame.turn_id = p.exchangeId;
    send(frame);
    if (p.entry) paint(p.entry);
  }

  function retryPending(p) {
    if (liveTurn() || (state.pending && state.pending !== p)) {
      showNotice("Wait for the current reply to finish first.", 4000);
      return;
    }
    clearTimeout(p.retryTimer);
    p.failed = false;
    state.pending = p;
    if (p.entry) {
      p.entry.status = "sending";
      if (state.entries.indexOf(p.entry) < 0) state.entries.push(p.entry);
      setEntryError(p.entry, "");
    }
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
    if (state.pending && state.pending.entry) paint(state.pending.entry);
    render(); // the reply controls wait for the connection
    if (code === 4401) {
      state.stopped = true;
      setStatus("unauthorized", "Sign-in refused");
      const hadToken = Boolean(state.credential && state.credential.token);
      signOut(state.config && state.config.auth === "jwt"
        ? "The server did not accept this token. Paste a new one."
        : hadToken ? "The server did not accept this token. Pick a name instead." : "The server refused this name.");
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
      case "turn.selected": return onSelected(f);
      case "feedback.recorded": return onFeedbackRecorded(f);
      case "memory": return onMemory(f);
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
    if (state.pending && state.pending.entry) paint(state.pending.entry);
    loadCharacters();
    hideNotice();
    render(); // the reply controls are live again
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
    // exchange_id and alternative (addition 19); a server without them: each turn its own exchange.
    const exchangeId = typeof f.exchange_id === "string" && f.exchange_id ? f.exchange_id
      : (p && p.clientTurnId === f.client_turn_id && p.kind === "regenerate" ? p.exchangeId : "");
    if (exchangeId) turn.entry.exchangeId = exchangeId;
    if (Number.isInteger(f.alternative)) turn.entry.alternative = f.alternative;
    if (p && p.clientTurnId === f.client_turn_id) {
      state.pending = null;
      clearTimeout(p.retryTimer);
      if (p.kind === "edit" && p.exchangeId !== f.turn_id) dropExchange(p.exchangeId);
      if (p.entry) {
        const existing = indexOfKey("u:" + f.turn_id);
        if (existing >= 0) {
          // The history already shows this message (it was accepted before a drop).
          state.entries.splice(state.entries.indexOf(p.entry), 1);
        } else {
          p.entry.key = "u:" + f.turn_id;
          p.entry.turnId = f.turn_id;
          p.entry.exchangeId = f.turn_id;
          p.entry.status = "sent";
          paint(p.entry);
        }
      }
      // A new reply is the one shown (and, by default, the one the model sees).
      state.selected.set(turn.entry.exchangeId, turn.turnId);
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
    // A reply whose user message the page does not show (a regenerated reply it resumed
    // after a reload, say): the history says which exchange it belongs to.
    if (indexOfKey("u:" + (turn.entry.exchangeId || turn.turnId)) < 0) requestHistory("latest");
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
    // Addition 19: user messages carry exchange_id; replies also alternative, alternatives, selected.
    if (typeof m.exchange_id === "string" && m.exchange_id) entry.exchangeId = m.exchange_id;
    else if (m.turn_id) entry.exchangeId = m.turn_id;
    if (Number.isInteger(m.alternative)) entry.alternative = m.alternative;
    if (Number.isInteger(m.alternatives)) entry.alternatives = m.alternatives;
    if (m.role === "assistant" && m.selected === true && entry.exchangeId && entry.turnId &&
        !writingIn(entry.exchangeId)) {
      state.selected.set(entry.exchangeId, entry.turnId);
    }
    paint(entry);
    return entry;
  }

  function onHistory(f) {
    const kind = state.historyQueue.shift() || "latest";
    if (f.conversation_id && f.conversation_id !== state.conversation) return;
    const messages = Array.isArray(f.messages) ? f.messages : [];
    if (kind === "latest") setCharacter(typeof f.character_id === "string" ? f.character_id : "");
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
    requestHistory("latest"); // what the conversation keeps (a character's binding, say)
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
    content_filter: "That message was blocked by the content filter.",
  };

  function onError(f) {
    const code = String(f.code || "internal");
    const text = ERROR_TEXT[code] || (typeof f.message === "string" ? f.message : "Error");
    const p = state.pending;
    if (f.client_turn_id && p && f.client_turn_id === p.clientTurnId) return rejectPending(p, code, text, f);
    if (settleRequests(f)) {
      showNotice(typeof f.message === "string" && f.message ? `${text} (${f.message})` : text, 6000);
      return;
    }
    const turn = f.turn_id ? state.turns.get(f.turn_id) : null;
    if (turn && turn.ended) {
      showNotice(text, 6000);
      return;
    }
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

  // A refused feedback or turn.select: drop the rating being saved, re-read the selection.
  // True when the error was for one of them.
  function settleRequests(f) {
    let settled = false;
    for (const e of state.entries) {
      if (e.ratingWanted && (!f.turn_id || e.turnId === f.turn_id)) {
        e.ratingWanted = 0;
        settled = true;
      }
      if (e.node.dataset.selectPending && (!f.turn_id || e.turnId === f.turn_id)) {
        delete e.node.dataset.selectPending;
        settled = true;
      }
    }
    if (settled) {
      requestHistory("latest");
      render();
    }
    return settled;
  }

  function pendingError(p, text, retry) {
    if (p.entry) setEntryError(p.entry, text, retry);
    else if (text) showNotice(text, retry ? 0 : 8000);
    else hideNotice();
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
        pendingError(p, `${text} Retrying in ${seconds(until - Date.now())}s…`, null);
      };
      tick();
      const countdown = setInterval(tick, 500);
      p.retryTimer = setTimeout(() => {
        clearInterval(countdown);
        if (state.pending !== p) return;
        pendingError(p, "", null);
        sendStart();
      }, delay);
      return;
    }
    p.failed = true;
    state.pending = null;
    if (p.entry) p.entry.status = "failed";
    let detail = text;
    if (Number.isFinite(wait) && wait > 0) detail += ` Try again in ${seconds(wait)}s.`;
    const retryable = code !== "bad_request" && code !== "too_large" && code !== "content_filter";
    pendingError(p, detail, retryable && p.entry ? () => retryPending(p) : null);
    if (code === "turn_in_progress" && f.turn_id && !state.turns.has(f.turn_id)) {
      // Show the reply that is running (e.g. started in another tab).
      const turn = trackTurn(f.turn_id);
      requestHistory("latest");
      resume(turn);
    }
    if ((code === "too_large" || code === "bad_request" || code === "content_filter") && p.text) {
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
    else {
      // A development name replaces a token kept from a link (a token would win otherwise).
      storage.set(KEYS.user, value);
      storage.remove(KEYS.token);
      state.credential = { user: value };
    }
    ui.signin.hidden = true;
    state.attempt = 0;
    connect();
    updateComposer();
    ui.input.focus();
  }

  function resetThread() {
    state.entries = [];
    state.turns.clear();
    state.selected.clear();
    if (state.pending) clearTimeout(state.pending.retryTimer);
    state.pending = null;
    state.editing = null;
    ui.editBanner.hidden = true;
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
    storage.remove(KEYS.token);
    storage.remove(KEYS.user);
    storage.remove(KEYS.conversation);
    storage.remove(KEYS.conversationCharacters);
    state.credential = null;
    state.characters.clear();
    state.charactersLoaded = false;
    state.conversation = (state.config && state.config.conversation_id) || "default";
    setCharacter("");
    resetThread();
    if (!message) setStatus("signed-out", "Signed out");
    showSignIn(message);
  }

  // ------------------------------------------------------------------ REST (Bearer token)

  class HttpError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  // A JSON request to this origin with the signed-in token (HTTP endpoints always need one).
  async function api(method, path, body) {
    const token = state.credential && state.credential.token;
    if (!token) throw new HttpError(401, "Sign in with a token to use this.");
    const headers = { Authorization: `Bearer ${token}`, Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const res = await fetch(path, { method, headers, cache: "no-store", credentials: "omit",
                                    body: body === undefined ? undefined : JSON.stringify(body) });
    let data = null;
    try { data = await res.json(); } catch { /* no JSON body */ }
    if (!res.ok) {
      const message = data && data.error && typeof data.error.message === "string" ? data.error.message
        : `The server answered ${res.status}.`;
      throw new HttpError(res.status, message);
    }
    return data;
  }

  // ------------------------------------------------------------------ characters (addition 18)

  function characterName(id) {
    const c = state.characters.get(id);
    return c && typeof c.name === "string" && c.name ? c.name : "";
  }

  function updateTitle() {
    const name = state.characterId ? characterName(state.characterId) : "";
    ui.title.textContent = name || "Rapport";
    ui.app.dataset.characterId = state.characterId;
    document.title = name ? `${name} · Rapport` : "Rapport";
  }

  // Which character each conversation has, as this device last saw it: the conversation
  // list (GET /v1/conversations) carries only ids, and the picker names them by character.
  function conversationCharacters() {
    try {
      const map = JSON.parse(storage.get(KEYS.conversationCharacters) || "{}");
      return map && typeof map === "object" && !Array.isArray(map) ? map : {};
    } catch {
      return {};
    }
  }

  function rememberConversation(conversationId, characterId) {
    const map = conversationCharacters();
    delete map[conversationId];
    map[conversationId] = characterId;
    const ids = Object.keys(map);
    for (const old of ids.slice(0, Math.max(0, ids.length - REMEMBERED_CONVERSATIONS))) delete map[old];
    storage.set(KEYS.conversationCharacters, JSON.stringify(map));
  }

  function setCharacter(id) {
    state.characterId = id || "";
    if (state.credential) rememberConversation(state.conversation, state.characterId);
    updateTitle();
    if (state.characterId && !characterName(state.characterId)) loadCharacter(state.characterId);
  }

  function remember(summary) {
    if (summary && typeof summary.id === "string") state.characters.set(summary.id, summary);
  }

  async function loadCharacters() {
    if (state.charactersLoaded || !state.credential || !state.credential.token) return [];
    try {
      const data = await api("GET", "/v1/characters");
      const list = Array.isArray(data) ? data
        : (data && (data.characters || data.data || data.items)) || [];
      state.characters.clear();
      list.forEach(remember);
      state.charactersLoaded = true;
      updateTitle();
      return list;
    } catch {
      return [];
    }
  }

  async function loadCharacter(id) {
    if (!state.credential || !state.credential.token) return;
    try {
      const data = await api("GET", `/v1/characters/${encodeURIComponent(id)}`);
      remember(data && data.character ? data.character : data);
      updateTitle();
    } catch { /* the header keeps the plain title */ }
  }

  function characterOption(id, name, description) {
    const li = el("li");
    const b = el("button", "character");
    b.type = "button";
    b.dataset.characterId = id;
    b.setAttribute("aria-pressed", String(state.chosenCharacter === id));
    const initial = id ? (name || "?").trim().charAt(0).toUpperCase() || "?" : "+";
    const avatar = el("span", "character-avatar", initial);
    avatar.setAttribute("aria-hidden", "true");
    const text = el("span", "character-text");
    text.append(el("span", "character-name", name));
    if (description) text.append(el("span", "character-description", description));
    b.append(avatar, text);
    b.addEventListener("click", () => {
      state.chosenCharacter = id;
      for (const other of ui.pickerList.querySelectorAll("button.character")) {
        other.setAttribute("aria-pressed", String(other === b));
      }
      ui.pickerStart.disabled = false;
    });
    li.append(b);
    return li;
  }

  async function openPicker() {
    ui.menu.hidden = true;
    ui.menuButton.setAttribute("aria-expanded", "false");
    state.chosenCharacter = "";
    ui.pickerList.replaceChildren(characterOption("", "No character", "A plain conversation."));
    ui.pickerStart.disabled = false;
    ui.pickerNote.hidden = true;
    ui.picker.hidden = false;
    ui.picker.dataset.loaded = "false";
    if (!state.credential || !state.credential.token) {
      ui.pickerNote.textContent = "Characters need a signed-in token (for example the link the server printed).";
      ui.pickerNote.hidden = false;
    } else {
      state.charactersLoaded = false;
      const list = await loadCharacters();
      for (const c of list) {
        if (!c || typeof c.id !== "string") continue;
        const description = typeof c.description === "string" ? c.description.slice(0, 140) : "";
        ui.pickerList.append(characterOption(c.id, typeof c.name === "string" && c.name ? c.name : c.id,
                                             description));
      }
      if (!list.length) {
        ui.pickerNote.textContent = state.charactersLoaded ? "No characters yet: an operator adds them."
          : "Could not load the characters.";
        ui.pickerNote.hidden = false;
      }
    }
    await listConversations();
    ui.picker.dataset.loaded = "true";
    const first = ui.pickerList.querySelector("button.character");
    if (first) first.focus();
  }

  // The user's other conversations, newest first, to switch to.
  async function listConversations() {
    ui.recentList.replaceChildren();
    ui.recentList.hidden = true;
    ui.recentTitle.hidden = true;
    if (!state.credential || !state.credential.token) return;
    let rows = [];
    try {
      const data = await api("GET", "/v1/conversations");
      rows = data && Array.isArray(data.conversations) ? data.conversations : [];
    } catch {
      return;
    }
    const known = conversationCharacters();
    const others = rows.filter((r) => r && typeof r.conversation_id === "string" &&
                                      r.conversation_id !== state.conversation).slice(0, RECENT_CONVERSATIONS);
    for (const row of others) {
      const id = row.conversation_id;
      const characterId = typeof known[id] === "string" ? known[id] : "";
      const name = characterName(characterId) || (id === "default" ? "First conversation" : "Conversation");
      const when = Number(row.last_activity_at) > 0 ? new Date(Number(row.last_activity_at)).toLocaleString() : "";
      const li = el("li");
      const b = el("button", "character");
      b.type = "button";
      b.dataset.conversationId = id;
      const avatar = el("span", "character-avatar", name.trim().charAt(0).toUpperCase() || "?");
      avatar.setAttribute("aria-hidden", "true");
      const text = el("span", "character-text");
      text.append(el("span", "character-name", name));
      if (when) text.append(el("span", "character-description", `Last message ${when}`));
      b.append(avatar, text);
      b.setAttribute("aria-label", when ? `${name}, last message ${when}` : name);
      b.addEventListener("click", () => {
        if (busy()) { showNotice("Wait for the current reply to finish first.", 4000); return; }
        switchConversation(id, characterId, []);
        closePicker();
      });
      li.append(b);
      ui.recentList.append(li);
    }
    ui.recentList.hidden = ui.recentTitle.hidden = others.length === 0;
  }

  function closePicker() {
    ui.picker.hidden = true;
    ui.menuButton.focus();
  }

  async function startConversation() {
    if (busy()) {
      showNotice("Wait for the current reply to finish first.", 4000);
      return;
    }
    const characterId = state.chosenCharacter || "";
    ui.pickerStart.disabled = true;
    try {
      if (characterId) {
        const made = await api("POST", "/v1/conversations", { character_id: characterId });
        switchConversation(made.conversation_id, made.character_id || characterId,
                           Array.isArray(made.messages) ? made.messages : []);
      } else {
        switchConversation(newId(), "", []);
      }
      closePicker();
      ui.input.focus();
    } catch (err) {
      ui.pickerNote.textContent = err instanceof Error ? err.message : "Could not start the conversation.";
      ui.pickerNote.hidden = false;
    } finally {
      ui.pickerStart.disabled = false;
    }
  }

  // Another conversation: a fresh thread, its first messages (the greeting) if known, then its history.
  function switchConversation(conversationId, characterId, messages) {
    resetThread();
    state.conversation = String(conversationId);
    storage.set(KEYS.conversation, state.conversation);
    setCharacter(characterId);
    state.entries = messages.map(historyEntry);
    state.historyLoaded = messages.length > 0; // else the history says whether it is empty
    render({ stick: true });
    requestHistory("latest");
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

  // Apps and the development sign-in link open the page as /#token=... (or /#user=... in
  // development mode). The fragment never reaches the server; it is kept here and taken
  // out of the address bar (and so out of the history and of anything copied from it).
  function credentialFromHash() {
    const hash = window.location.hash.replace(/^#/, "");
    if (!hash) return;
    const params = new URLSearchParams(hash);
    const token = params.get("token");
    const user = params.get("user");
    const previous = storage.get(KEYS.token) || storage.get(KEYS.user);
    if (token) storage.set(KEYS.token, token);
    else if (user) { storage.set(KEYS.user, user); storage.remove(KEYS.token); }
    // Someone else signing in on this device starts from the default conversation.
    if ((token || user) && (token || user) !== previous) storage.remove(KEYS.conversation);
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
      if (ev.key === "Escape" && state.editing) cancelEdit();
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
    ui.newChat.addEventListener("click", openPicker);
    ui.pickerForm.addEventListener("submit", (ev) => { ev.preventDefault(); startConversation(); });
    ui.pickerCancel.addEventListener("click", closePicker);
    ui.picker.addEventListener("keydown", (ev) => { if (ev.key === "Escape") closePicker(); });
    ui.picker.addEventListener("click", (ev) => { if (ev.target === ui.picker) closePicker(); });
    ui.editCancel.addEventListener("click", cancelEdit);
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
    state.conversation = storage.get(KEYS.conversation) || state.config.conversation_id || "default";
    if (state.config.model) showModel(state.config.model);
    if (Number(state.config.max_input_chars) > 0) ui.input.maxLength = Number(state.config.max_input_chars);
    // A token (from a link or pasted) works in either mode; a bare name only in development mode.
    const token = storage.get(KEYS.token);
    const user = state.config.auth === "jwt" ? null : storage.get(KEYS.user);
    if (token) state.credential = { token };
    else if (user) state.credential = { user };
    if (!state.credential) {
      setStatus("signed-out", "Not signed in");
      showSignIn("");
      return;
    }
    connect();
  }

  main();
})();
