// The live stream of hops (WebSocket /ws/flows/), with catch-up after gaps and reconnects.
//
// Slots are gap-free per process (CONTRACT), so we remember the last slot seen per
// process; after a reconnect, or when a slot is skipped, we fetch what we missed with
// GET /api/messages?process=<id>&after_slot=<n>. Hops are de-duplicated by message id.

import { api, setLiveState, wsURL } from "./lib.js";

const SEEN_LIMIT = 20000;

export class HopStream {
  constructor({ slots = {}, onHop = () => {}, onFlow = () => {}, path = "/ws/flows/" } = {}) {
    this.slots = { ...slots }; // process id -> last slot seen
    this.onHop = onHop;
    this.onFlow = onFlow;
    this.path = path;
    this.seen = new Set();
    this.socket = null;
    this.backoff = 500;
    this.gapTimers = new Map();
    this.catchingUp = new Set();
    this.opened = 0;
  }

  start() {
    this.connect();
    window.addEventListener("online", () => this.reconnectNow());
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && (!this.socket || this.socket.readyState > 1)) this.reconnectNow();
    });
    return this;
  }

  reconnectNow() {
    clearTimeout(this.retryTimer);
    this.backoff = 500;
    if (!this.socket || this.socket.readyState > 1) this.connect();
  }

  connect() {
    let socket;
    try {
      socket = new WebSocket(wsURL(this.path));
    } catch {
      this.scheduleReconnect();
      return;
    }
    this.socket = socket;
    socket.addEventListener("open", () => {
      this.backoff = 500;
      this.opened += 1;
      setLiveState("live");
      // The page was rendered a moment ago, or we were away: fetch whatever we missed.
      this.catchUpAll();
    });
    socket.addEventListener("message", (e) => {
      let event;
      try { event = JSON.parse(e.data); } catch { return; }
      if (event.type === "hop" && event.message) this.accept(event);
      else if (event.type === "flow") this.onFlow(event);
    });
    socket.addEventListener("close", () => {
      if (this.socket !== socket) return;
      setLiveState("reconnecting");
      this.scheduleReconnect();
    });
    socket.addEventListener("error", () => { /* close follows; handled there */ });
  }

  scheduleReconnect() {
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => this.connect(), this.backoff);
    this.backoff = Math.min(this.backoff * 2, 10000);
  }

  remember(id) {
    if (this.seen.has(id)) return false;
    this.seen.add(id);
    if (this.seen.size > SEEN_LIMIT) {
      // Sets iterate in insertion order: drop the oldest half.
      let n = SEEN_LIMIT / 2;
      for (const old of this.seen) { this.seen.delete(old); if (--n <= 0) break; }
    }
    return true;
  }

  accept(event, source = "live") {
    const m = event.message;
    if (!m || !m.id || !this.remember(m.id)) return;
    const target = m.target;
    if (m.slot != null && target in this.slots) {
      const last = this.slots[target];
      if (m.slot > last + 1 && source === "live") this.scheduleGapFill(target); // fetch from the gap
      else if (m.slot > last) this.slots[target] = m.slot;
    }
    this.onHop(event, source);
  }

  scheduleGapFill(processId) {
    // Events from parallel workers can arrive slightly out of order: wait a moment first.
    if (this.gapTimers.has(processId)) return;
    this.gapTimers.set(processId, setTimeout(() => {
      this.gapTimers.delete(processId);
      this.catchUp(processId);
    }, 700));
  }

  catchUpAll() {
    for (const processId of Object.keys(this.slots)) this.catchUp(processId);
  }

  async catchUp(processId) {
    if (this.catchingUp.has(processId)) return;
    this.catchingUp.add(processId);
    try {
      for (let page = 0; page < 20; page++) {
        const after = this.slots[processId] ?? 0;
        const res = await api(`/api/messages?process=${encodeURIComponent(processId)}&after_slot=${after}&limit=200`);
        if (!res.ok || !res.data || !Array.isArray(res.data.results)) return;
        const messages = res.data.results.filter((m) => m.slot != null).sort((a, b) => a.slot - b.slot);
        if (!messages.length) return;
        let top = after;
        for (const m of messages) {
          top = Math.max(top, m.slot);
          this.accept({ type: "hop", flow: m.pushed_for, message: m }, "catchup");
        }
        this.slots[processId] = Math.max(this.slots[processId] ?? 0, top);
        if (top <= after) return;
      }
    } finally {
      this.catchingUp.delete(processId);
    }
  }
}

/** Watch one flow: its hops and its end, with a catch-up from GET /api/flows/{id}. */
export function watchFlow(flowId, { onHop, onEnd }) {
  const seen = new Set();
  let ended = false;
  let socket = null;
  let retry = 500;
  let pollTimer = null;

  const hop = (m) => {
    if (!m || !m.id || seen.has(m.id)) return;
    seen.add(m.id);
    onHop(m);
  };
  const end = (status, error) => {
    if (ended) return;
    ended = true;
    clearTimeout(pollTimer);
    if (socket) socket.close();
    onEnd(status, error || "");
  };
  const sync = async () => {
    const res = await api(`/api/flows/${encodeURIComponent(flowId)}`);
    if (!res.ok || !res.data) return false;
    for (const m of res.data.messages || []) if (m.status !== "pending") hop(m);
    if (res.data.status && res.data.status !== "pending") end(res.data.status, res.data.error);
    return true;
  };
  const poll = () => {
    // Only while the socket is down: the socket is the normal path.
    clearTimeout(pollTimer);
    pollTimer = setTimeout(async () => {
      if (ended) return;
      if (!socket || socket.readyState !== WebSocket.OPEN) await sync();
      poll();
    }, 3000);
  };
  const connect = () => {
    socket = new WebSocket(wsURL(`/ws/flows/${flowId}/`));
    socket.addEventListener("open", () => { retry = 500; sync(); });
    socket.addEventListener("message", async (e) => {
      let event;
      try { event = JSON.parse(e.data); } catch { return; }
      if (event.type === "hop") hop(event.message);
      else if (event.type === "flow" && event.status !== "pending") {
        await sync(); // pick up any hop the end overtook, then finish
        end(event.status, event.error);
      }
    });
    socket.addEventListener("close", () => {
      if (ended) return;
      setTimeout(connect, retry);
      retry = Math.min(retry * 2, 8000);
    });
  };
  connect();
  poll();
  return { close: () => { ended = true; clearTimeout(pollTimer); if (socket) socket.close(); } };
}
