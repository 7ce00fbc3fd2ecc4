// /: dashboard figures, the live diagram, the hop feed and (signed in) the wallet panel.
import "./common.js";
import { bindPauseBanner, startHealth } from "./dashboard.js";
import { Diagram } from "./diagram.js";
import { $, $$, el, readJSON, shortId } from "./lib.js";
import { HopStream } from "./live.js";
import { Wallet } from "./wallet.js";

const info = readJSON("diagram-data") || { processes: [], slots: {}, me: "", myFlows: [] };
const names = new Map(info.processes.map((p) => [p.id, p.name]));
const wallets = new Map(Object.entries(info.wallets || {}));
const health = startHealth();
bindPauseBanner();

// --- counters ---------------------------------------------------------------------
const card = document.getElementById("diagram-card");
const rateEl = $("[data-rate]", card);
const totalEl = $("[data-total]", card);
const droppedEl = $("[data-dropped]", card);
const fmt = new Intl.NumberFormat();
const diagram = new Diagram(document.getElementById("diagram"), {
  processes: info.processes, me: info.me, myFlows: info.myFlows,
  onCounters: ({ rate, total, dropped }) => {
    const r = rate >= 100 ? fmt.format(Math.round(rate)) : rate.toFixed(1);
    if (rateEl.textContent !== r) rateEl.textContent = r;
    const t = fmt.format(total);
    if (totalEl.textContent !== t) totalEl.textContent = t;
    const d = dropped ? `${fmt.format(dropped)} hops counted but not drawn (at most 12 animate at once)` : "";
    if (droppedEl.textContent !== d) droppedEl.textContent = d;
  },
});
document.addEventListener("tim3:health", (e) => diagram.setHealth(e.detail));

for (const radio of $$('input[name="diagram-filter"]', card)) {
  radio.addEventListener("change", () => diagram.setFilter(radio.value));
}

// --- replay -----------------------------------------------------------------------
const replayForm = $("[data-replay]", card);
const replayBar = $("[data-replay-bar]", card);
const replayText = $("[data-replay-text]", card);
replayForm.addEventListener("submit", (e) => {
  e.preventDefault();
  const flow = replayForm.elements.flow.value;
  const speed = Number(replayForm.elements.speed.value) || 1;
  if (!flow) { replayForm.elements.flow.focus(); return; }
  const label = replayForm.elements.flow.selectedOptions[0].textContent.trim();
  replayBar.hidden = false;
  replayText.textContent = `Loading ${label}…`;
  diagram.replay(flow, speed, {
    onProgress: (i, n, m) => { replayText.textContent = `Replaying ${label} at ${speed}× — hop ${i} of ${n}: ${m.action}`; },
    onDone: (problem) => {
      if (problem) { replayText.textContent = problem; setTimeout(() => { replayBar.hidden = true; }, 3000); }
      else { replayText.textContent = `Replay finished: ${label}`; setTimeout(() => { replayBar.hidden = true; }, 2500); }
    },
  });
});
$("[data-replay-stop]", card).addEventListener("click", () => { diagram.stopReplay(); replayBar.hidden = true; });

// --- hop feed (coalesced per frame, newest 12 rows) ---------------------------------
const feed = document.getElementById("hops-body");
let feedQueue = [];
let feedScheduled = false;
function label(address) {
  if (names.has(address)) return names.get(address);
  if (address === info.me) return "you";
  return wallets.get(address) || shortId(address, 6);
}
function addr(address) {
  const kind = names.has(address) ? "process" : address === info.me ? "you" : "wallet";
  const href = kind === "process" ? `/explorer/processes/${address}` : `/explorer/addresses/${address}`;
  return el("a", { class: `addr addr-${kind}`, href, title: address, text: label(address) });
}
function renderFeed() {
  feedScheduled = false;
  const batch = feedQueue.slice(-12);
  feedQueue = [];
  feed.querySelector(".empty-row")?.remove();
  const rows = batch.reverse().map((m) => el("tr", { class: `row-new ${m.status === "failed" ? "row-failed" : ""}` },
    el("td", {}, el("a", { class: "action-link", href: `/explorer/messages/${m.id}`, text: m.action || "(no action)" }),
      el("div", { class: "route-inline small muted", "aria-hidden": "true", text: `${label(m.from)} → ${label(m.target)}` })),
    el("td", { class: "route" }, addr(m.from), " → ", addr(m.target)),
    el("td", { class: "mono small", text: m.slot ?? "—" }),
    el("td", {}, el("span", { class: `status status-${m.status}`, text: m.status }))));
  feed.prepend(...rows);
  while (feed.children.length > 12) feed.lastElementChild.remove();
}

// --- the stream ---------------------------------------------------------------------
let walletPanel = null;
const stream = new HopStream({
  slots: info.slots,
  onHop: (event, source) => {
    diagram.push(event);
    feedQueue.push(event.message);
    if (feedQueue.length > 48) feedQueue.splice(0, feedQueue.length - 12);
    if (!feedScheduled) { feedScheduled = true; requestAnimationFrame(renderFeed); }
  },
  onFlow: (event) => {
    health.refreshSoon();
    if (walletPanel && diagram.myFlows.has(event.flow)) walletPanel.refreshBalances();
  },
}).start();

// For the console and the browser tests: the live objects of this page.
window.tim3Live = { diagram, stream };

const walletData = readJSON("wallet-data");
if (walletData) {
  walletPanel = new Wallet(walletData, {
    onFlowStarted: ({ flowId }) => diagram.addMyFlow(flowId),
    onFlowEnded: () => health.refreshSoon(),
  });
}
