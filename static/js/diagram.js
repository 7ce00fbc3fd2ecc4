// The live flow diagram: hand-written SVG nodes, one moving dot per hop.
//
// Hops arrive at any rate; we never touch the DOM per hop. They are queued, and once
// per animation frame the newest few start animating (at most MAX_ACTIVE at a time,
// from a fixed pool of SVG elements); the rest are counted, never drawn. Counters
// and figures update a few times a second.

import { api, formatUnits, shortId } from "./lib.js";

const SVG = "http://www.w3.org/2000/svg";
const MAX_ACTIVE = 12;
const DURATION = 900; // ms per hop at 1x
const LANE = 7; // px: requests and replies travel on opposite sides of an edge

// Two hand-made layouts: wide (the server-rendered one) and tall, for phones.
const LAYOUTS = {
  wide: {
    box: [820, 470],
    at: { user: [95, 235], usda: [300, 85], coordinator: [515, 235], "lock-manager": [300, 385], tim3: [725, 105], "state-manager": [725, 365] },
  },
  tall: {
    box: [400, 520],
    at: { user: [100, 70], usda: [300, 70], coordinator: [100, 260], "lock-manager": [300, 260], tim3: [100, 450], "state-manager": [300, 450] },
  },
};

export class Diagram {
  constructor(svg, { processes = [], me = "", myFlows = [], onCounters = () => {} } = {}) {
    this.svg = svg;
    this.me = me;
    this.myFlows = new Set(myFlows);
    this.filter = "all";
    this.onCounters = onCounters;
    this.processNode = new Map(processes.map((p) => [p.id, p.node]));
    this.processName = new Map(processes.map((p) => [p.id, p.name]));
    this.nodes = new Map();
    for (const g of svg.querySelectorAll("[data-node]")) {
      const m = /translate\(([-\d.]+)[ ,]+([-\d.]+)\)/.exec(g.getAttribute("transform"));
      this.nodes.set(g.dataset.node, { g, x: +m[1], y: +m[2], hitUntil: 0, failUntil: 0 });
    }
    this.edges = new Map();
    for (const line of svg.querySelectorAll("[data-edge]")) this.edges.set(line.dataset.edge, { line, active: 0 });
    const narrow = window.matchMedia("(max-width: 640px)");
    const relayout = () => this.layout(narrow.matches ? "tall" : "wide");
    narrow.addEventListener("change", relayout);
    relayout();
    this.layer = svg.querySelector(".hops-layer");
    this.pool = [];
    for (let i = 0; i < MAX_ACTIVE; i++) {
      const g = document.createElementNS(SVG, "g");
      g.setAttribute("visibility", "hidden");
      const dot = document.createElementNS(SVG, "circle");
      dot.setAttribute("r", "6.5");
      dot.setAttribute("class", "hop-dot");
      const label = document.createElementNS(SVG, "text");
      label.setAttribute("class", "hop-label");
      label.setAttribute("y", "-12");
      g.append(dot, label);
      this.layer.append(g);
      this.pool.push({ g, dot, label });
    }
    this.queue = [];
    this.active = [];
    this.total = 0;
    this.dropped = 0;
    this.buckets = new Map(); // 250 ms bucket -> hops
    this.running = false;
    this.replaying = false;
    this.lastCounters = 0;
    this.tick = this.tick.bind(this);
    setInterval(() => this.publishCounters(performance.now(), true), 1000);
  }

  layout(name) {
    const { box, at } = LAYOUTS[name];
    this.svg.setAttribute("viewBox", `0 0 ${box[0]} ${box[1]}`);
    const bg = this.svg.querySelector("rect[fill^='url']");
    if (bg) { bg.setAttribute("width", box[0]); bg.setAttribute("height", box[1]); }
    for (const [key, node] of this.nodes) {
      if (!at[key]) continue;
      [node.x, node.y] = at[key];
      node.g.setAttribute("transform", `translate(${node.x} ${node.y})`);
    }
    for (const [key, edge] of this.edges) {
      const [a, b] = key.split("|").map((k) => this.nodes.get(k));
      if (!a || !b) continue;
      edge.line.setAttribute("x1", a.x); edge.line.setAttribute("y1", a.y);
      edge.line.setAttribute("x2", b.x); edge.line.setAttribute("y2", b.y);
    }
    this.svg.dataset.layout = name;
  }

  setFilter(value) {
    this.filter = value;
  }

  addMyFlow(flowId) {
    this.myFlows.add(flowId);
  }

  nodeOf(address) {
    return this.processNode.get(address) || "user";
  }

  isMine(event) {
    const m = event.message;
    if (!this.me) return false;
    if (this.myFlows.has(event.flow)) return true;
    if (m.from === this.me || m.target === this.me) {
      this.myFlows.add(event.flow);
      return true;
    }
    return false;
  }

  /** A live hop (counted always; drawn unless filtered out or a replay is running). */
  push(event) {
    const now = performance.now();
    this.total += 1;
    const bucket = Math.floor(now / 250);
    this.buckets.set(bucket, (this.buckets.get(bucket) || 0) + 1);
    const mine = this.isMine(event);
    if (this.replaying || (this.filter === "mine" && !mine)) return;
    this.queue.push({ m: event.message, mine, replay: false, speed: 1 });
    if (this.queue.length > 4 * MAX_ACTIVE) {
      // Keep only the newest; older ones would be stale by the time they could run.
      const excess = this.queue.length - 2 * MAX_ACTIVE;
      this.queue.splice(0, excess);
      this.dropped += excess;
    }
    this.wake();
  }

  wake() {
    if (!this.running) {
      this.running = true;
      requestAnimationFrame(this.tick);
    }
  }

  start(item, now) {
    const slot = this.pool.pop();
    if (!slot) return false;
    const fromKey = this.nodeOf(item.m.from);
    const toKey = this.nodeOf(item.m.target);
    const a = this.nodes.get(fromKey);
    const b = this.nodes.get(toKey);
    if (!a || !b) { this.pool.push(slot); return true; }
    let dx = b.x - a.x, dy = b.y - a.y;
    const len = Math.hypot(dx, dy) || 1;
    // Perpendicular lane offset: the direction decides the side.
    const ox = (-dy / len) * LANE, oy = (dx / len) * LANE;
    const failed = item.m.status === "failed";
    const cls = failed ? "failed" : item.replay ? "replay" : item.mine ? "mine" : "";
    slot.dot.setAttribute("class", `hop-dot ${cls}`);
    slot.dot.setAttribute("r", item.mine || item.replay ? "7.5" : "6");
    slot.label.setAttribute("class", `hop-label ${cls}`);
    slot.label.textContent = item.m.action || "(no action)";
    slot.g.setAttribute("visibility", "visible");
    const self = fromKey === toKey;
    const edgeKey = [fromKey, toKey].sort().join("|");
    const edge = this.edges.get(`${fromKey}|${toKey}`) || this.edges.get(`${toKey}|${fromKey}`) || this.edges.get(edgeKey);
    if (edge) { edge.active += 1; edge.line.classList.add("active"); }
    this.active.push({
      slot, edge, toKey, failed, self,
      x0: a.x + ox, y0: a.y + oy, x1: b.x + ox, y1: b.y + oy,
      t0: now, dur: DURATION / (item.speed || 1),
    });
    return true;
  }

  tick(now) {
    // 1. Start as many queued hops as there is room for, newest first.
    const room = MAX_ACTIVE - this.active.length;
    if (this.queue.length) {
      const take = this.queue.splice(Math.max(0, this.queue.length - room), room);
      this.dropped += this.queue.length;
      this.queue.length = 0;
      for (const item of take) this.start(item, now);
    }
    // 2. Move every active hop.
    const still = [];
    for (const a of this.active) {
      const p = Math.min(1, (now - a.t0) / a.dur);
      const e = p < 0.5 ? 2 * p * p : 1 - Math.pow(-2 * p + 2, 2) / 2; // ease in-out
      let x = a.x0 + (a.x1 - a.x0) * e;
      let y = a.y0 + (a.y1 - a.y0) * e;
      if (a.self) { x += Math.sin(p * Math.PI) * 40; y -= Math.sin(p * Math.PI) * 50; }
      a.slot.g.setAttribute("transform", `translate(${x.toFixed(1)} ${y.toFixed(1)})`);
      a.slot.g.setAttribute("opacity", p > 0.85 ? ((1 - p) / 0.15).toFixed(2) : "1");
      // The label only between the nodes, where it does not cover their names.
      a.slot.label.setAttribute("opacity", Math.max(0, Math.min(1, (p - 0.08) / 0.12, (0.9 - p) / 0.12)).toFixed(2));
      if (p >= 1) {
        a.slot.g.setAttribute("visibility", "hidden");
        this.pool.push(a.slot);
        if (a.edge && --a.edge.active <= 0) { a.edge.active = 0; a.edge.line.classList.remove("active"); }
        const node = this.nodes.get(a.toKey);
        if (node) {
          if (a.failed) node.failUntil = now + 600;
          else node.hitUntil = now + 350;
        }
      } else {
        still.push(a);
      }
    }
    this.active = still;
    // 3. Node highlights.
    let glowing = false;
    for (const node of this.nodes.values()) {
      const hit = node.hitUntil > now, fail = node.failUntil > now;
      node.g.classList.toggle("hit", hit && !fail);
      node.g.classList.toggle("hit-fail", fail);
      glowing = glowing || hit || fail;
    }
    this.publishCounters(now);
    if (this.active.length || this.queue.length || glowing) requestAnimationFrame(this.tick);
    else this.running = false;
  }

  rate(now) {
    const current = Math.floor(now / 250);
    let sum = 0;
    for (const [bucket, n] of this.buckets) {
      if (bucket <= current - 20) this.buckets.delete(bucket);
      else if (bucket > current - 20) sum += n;
    }
    return sum / 5; // 20 buckets of 250 ms
  }

  publishCounters(now, force = false) {
    if (!force && now - this.lastCounters < 250) return;
    this.lastCounters = now;
    this.onCounters({ rate: this.rate(now), total: this.total, dropped: this.dropped });
  }

  /** Node figures and the paused badge, from /api/health. */
  setHealth(h) {
    if (!h) return;
    const set = (key, text) => {
      const node = this.svg.querySelector(`[data-figure="${key}"]`);
      if (node && node.textContent !== text) node.textContent = text;
    };
    set("usda", `reserves ${formatUnits(h.usda_reserves)}`);
    set("tim3", `supply ${formatUnits(h.tim3_supply)} TIM3`);
    set("coordinator", `${h.pending_operations} pending${h.paused && (h.paused.mint || h.paused.redeem) ? " · paused" : ""}`);
    set("lock-manager", `locked ${formatUnits(h.usda_locked ?? 0)} USDA`);
    set("state-manager", `health ${h.health_score}/100`);
    const paused = h.paused || {};
    const badge = this.svg.querySelector('[data-badge="paused"]');
    const coord = this.nodes.get("coordinator");
    const any = paused.mint || paused.redeem;
    if (badge) {
      badge.setAttribute("visibility", any ? "visible" : "hidden");
      const text = badge.querySelector("text");
      const label = paused.mint && paused.redeem ? "PAUSED" : paused.mint ? "MINT PAUSED" : "REDEEM PAUSED";
      text.textContent = label;
      const rect = badge.querySelector("rect");
      const w = label.length * 7.2 + 16;
      rect.setAttribute("width", w.toFixed(0));
      rect.setAttribute("x", (-w / 2).toFixed(0));
    }
    if (coord) coord.g.classList.toggle("paused", Boolean(any));
  }

  /** Replay a past flow's hops in order, spaced like they happened, at `speed`. */
  async replay(flowId, speed, { onProgress = () => {}, onDone = () => {} } = {}) {
    this.stopReplay();
    const res = await api(`/api/messages?flow=${encodeURIComponent(flowId)}&limit=200`);
    if (!res.ok || !res.data || !Array.isArray(res.data.results)) {
      onDone(res.status === 404 ? "That flow has no messages to replay." : "Could not load the flow's messages.");
      return;
    }
    // Newest first from the API: play them oldest first.
    const messages = res.data.results.filter((m) => m.status !== "pending").reverse();
    if (!messages.length) { onDone("That flow has no applied messages yet."); return; }
    this.replaying = true;
    this.queue.length = 0;
    const timers = [];
    this.replayTimers = timers;
    let at = 0;
    let previous = null;
    messages.forEach((m, i) => {
      if (previous !== null) {
        const real = Math.max(0, (m.timestamp || 0) - (previous.timestamp || 0));
        at += Math.min(1600, Math.max(650, real)) / speed;
      }
      previous = m;
      timers.push(setTimeout(() => {
        this.queue.push({ m, mine: false, replay: true, speed });
        this.wake();
        onProgress(i + 1, messages.length, m);
      }, at));
    });
    timers.push(setTimeout(() => { this.replaying = false; onDone(null); }, at + DURATION / speed + 100));
  }

  stopReplay() {
    for (const t of this.replayTimers || []) clearTimeout(t);
    this.replayTimers = [];
    this.replaying = false;
  }

  label(address) {
    if (this.processName.has(address)) return this.processName.get(address);
    if (address && address === this.me) return "you";
    return shortId(address, 6);
  }
}
