// Dashboard figures (GET /api/health): polled every few seconds and refreshed soon after
// a flow ends. Every page that shows pause state listens for "tim3:health".

import { $, api, debounce, formatUnits } from "./lib.js";

const POLL_MS = 5000;

function setText(root, key, text) {
  const node = $(`[data-stat="${key}"]`, root);
  if (node && node.textContent !== text) {
    node.textContent = text;
    const card = node.closest(".stat");
    if (card) {
      card.classList.remove("flash-update");
      void card.offsetWidth; // restart the animation
      card.classList.add("flash-update");
    }
  }
  return node;
}

function render(root, h) {
  setText(root, "tim3_supply", formatUnits(h.tim3_supply));
  setText(root, "usda_reserves", formatUnits(h.usda_reserves));
  if (h.usda_held !== undefined) setText(root, "usda_held", formatUnits(h.usda_held));
  if (h.usda_locked !== undefined) setText(root, "usda_locked", formatUnits(h.usda_locked));
  setText(root, "collateral_ratio", h.collateral_ratio === "inf" ? "—" : String(h.collateral_ratio));
  setText(root, "health_score", String(h.health_score));
  const meter = $("[data-stat-meter]", root);
  if (meter) meter.style.width = `${Math.max(0, Math.min(100, Number(h.health_score) || 0))}%`;
  setText(root, "pending_operations", String(h.pending_operations));
  const checked = $('[data-stat="checked_at"]', root);
  if (checked && h.checked_at) {
    checked.setAttribute("datetime", h.checked_at);
    checked.textContent = `${String(h.checked_at).slice(11, 19)} UTC`;
  }
  const ok = $('[data-stat="reserves_ok"]', root);
  if (ok) {
    const state = h.reserves_ok ? "true" : "false";
    const card = ok.closest(".stat");
    if (card.dataset.reservesOk !== state) {
      card.dataset.reservesOk = state;
      ok.innerHTML = h.reserves_ok
        ? '<span class="ok-mark" aria-hidden="true">✓</span> Fully backed'
        : '<span class="bad-mark" aria-hidden="true">!</span> Mismatch';
    }
  }
  const p = h.paused || {};
  const paused = $('[data-stat="paused"]', root);
  if (paused) {
    const [dot, text] = p.mint && p.redeem ? ["red", "Paused"] : p.mint ? ["amber", "Mint paused"]
      : p.redeem ? ["amber", "Redeem paused"] : ["green", "Operational"];
    const html = `<span class="dot dot-${dot}"></span>${text}`;
    if (paused.innerHTML !== html) paused.innerHTML = html;
    const reason = p.reason ? (p.reason.length > 40 ? p.reason.slice(0, 39) + "…" : p.reason) : "all flows open";
    const sub = $('[data-stat="paused_sub"]', root);
    if (sub && sub.textContent !== reason) sub.textContent = reason;
  }
}

/** Poll /api/health; returns {refreshSoon}. Works with or without the stats block. */
export function startHealth({ root = document.getElementById("stats"), interval = POLL_MS } = {}) {
  let timer = null;
  let inFlight = false;
  const poll = async () => {
    clearTimeout(timer);
    if (!document.hidden && !inFlight) {
      inFlight = true;
      const res = await api("/api/health");
      inFlight = false;
      if (res.ok && res.data) {
        if (root) render(root, res.data);
        document.dispatchEvent(new CustomEvent("tim3:health", { detail: res.data }));
      }
    }
    timer = setTimeout(poll, interval);
  };
  document.addEventListener("visibilitychange", () => { if (!document.hidden) poll(); });
  timer = setTimeout(poll, 300);
  return { refreshSoon: debounce(poll, 400), poll };
}

/** Keep the pause banner in step with the system (server-rendered first, then live). */
export function bindPauseBanner() {
  const banner = document.getElementById("pause-banner");
  if (!banner) return;
  document.addEventListener("tim3:health", (e) => {
    const p = e.detail.paused || {};
    const any = Boolean(p.mint || p.redeem);
    const wasHidden = banner.hidden;
    banner.hidden = !any;
    if (!any) return;
    const title = p.mint && p.redeem ? "The system is paused: deposits and redemptions are disabled"
      : p.mint ? "Minting is paused: deposits are disabled, redemptions still work"
        : "Redemptions are paused: deposits still work";
    const t = $('[data-pause="title"]', banner);
    if (t.textContent !== title) t.textContent = title;
    const r = $('[data-pause="reason"]', banner);
    const reason = p.reason || "risk alert";
    if (r.textContent !== reason) r.textContent = reason;
    if (wasHidden) {
      const meta = $('[data-pause="meta"]', banner);
      const when = p.at ? new Date(Number(p.at)).toUTCString().replace(" GMT", " UTC") : "";
      meta.textContent = when ? `Paused ${when}` : "";
    }
  });
}
