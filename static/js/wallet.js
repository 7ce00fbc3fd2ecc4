// The wallet: swap-style deposit and redeem boxes, the faucet, pending cards that tick
// off as the real hops arrive, history rows and balances that update without a reload.
//
// Without JavaScript the same forms post to Django views; here we validate inline,
// submit to the JSON API (CONTRACT) and watch the flow over the websocket.

import { $, $$, api, el, formatUnits, idempotencyKey, parseAmount, timeOfDay, toBig } from "./lib.js";
import { watchFlow } from "./live.js";

const KIND_UNITS = { deposit: "USDA", redeem: "TIM3", faucet: "USDA" };

export class Wallet {
  constructor(data, { onFlowStarted = () => {}, onFlowEnded = () => {} } = {}) {
    this.data = data;
    this.b = Object.fromEntries(Object.entries(data.balances).map(([k, v]) => [k, toBig(v)]));
    this.limits = Object.fromEntries(Object.entries(data.limits || {}).map(([k, v]) => [k, /^\d+$/.test(String(v)) ? toBig(v) : v]));
    this.paused = { ...data.paused };
    this.onFlowStarted = onFlowStarted;
    this.onFlowEnded = onFlowEnded;
    this.cards = document.getElementById("pending-cards");
    this.template = document.getElementById("pending-card-tpl");
    this.forms = $$("form[data-swap]").map((form) => new SwapForm(form, this));
    const faucet = $("form[data-faucet]");
    if (faucet) this.faucet = new FaucetForm(faucet, this);
    this.initTabs();
    this.watchPendingHistory();
    document.addEventListener("tim3:health", (e) => {
      // What the coordinators hold in custody is what v2 redemptions can be paid from.
      if (e.detail.usda_held !== undefined) this.limits.payout_available = toBig(e.detail.usda_held);
      this.setPaused(e.detail.paused || {});
    });
  }

  initTabs() {
    const tabs = $("[data-tabs]");
    if (!tabs) return;
    const buttons = $$('[role="tab"]', tabs);
    const select = (button, focus = false) => {
      for (const b of buttons) {
        const on = b === button;
        b.setAttribute("aria-selected", String(on));
        b.tabIndex = on ? 0 : -1;
        const panel = document.getElementById(b.getAttribute("aria-controls"));
        if (panel) {
          panel.hidden = !on;
          panel.setAttribute("role", "tabpanel");
          panel.setAttribute("aria-labelledby", b.id);
        }
      }
      if (focus) button.focus();
    };
    buttons.forEach((b, i) => {
      b.addEventListener("click", () => select(b));
      b.addEventListener("keydown", (e) => {
        const dir = e.key === "ArrowRight" ? 1 : e.key === "ArrowLeft" ? -1 : 0;
        if (dir) { e.preventDefault(); select(buttons[(i + dir + buttons.length) % buttons.length], true); }
      });
    });
    select(buttons.find((b) => b.getAttribute("aria-selected") === "true") || buttons[0]);
  }

  /** Flows still pending when the page was rendered (a reload mid-flow, or the no-JS path). */
  watchPendingHistory() {
    for (const row of $$('#history-body tr[data-flow]')) {
      if (row.querySelector('[data-status="pending"]')) {
        watchFlow(row.dataset.flow, {
          onHop: () => {},
          onEnd: (status, error) => {
            this.updateHistoryRow(row.dataset.flow, status, error);
            this.refreshBalances();
            this.onFlowEnded({ flowId: row.dataset.flow, status });
          },
        });
      }
    }
  }

  setPaused(p) {
    const changed = p.mint !== this.paused.mint || p.redeem !== this.paused.redeem || p.reason !== this.paused.reason;
    this.paused = { mint: Boolean(p.mint), redeem: Boolean(p.redeem), reason: p.reason || "" };
    if (changed) for (const f of this.forms) f.applyPause();
  }

  async refreshBalances() {
    const res = await api("/api/wallet");
    if (!res.ok || !res.data || !res.data.balances) return;
    const usda = toBig(res.data.balances.USDA);
    const locked = toBig(res.data.locked ? res.data.locked.USDA : 0);
    this.setBalances({ usda, usda_locked: locked, usda_available: usda - locked, tim3: toBig(res.data.balances.TIM3) });
  }

  setBalances(values) {
    for (const [key, value] of Object.entries(values)) {
      const changed = this.b[key] !== value;
      this.b[key] = value;
      for (const node of $$(`[data-balance="${key}"]`)) {
        const text = formatUnits(value);
        if (node.textContent !== text) {
          node.textContent = text;
          if (changed) {
            const box = node.closest(".balance-value, dd");
            if (box) { box.classList.remove("bump"); void box.offsetWidth; box.classList.add("bump"); }
          }
        }
      }
    }
    for (const f of this.forms) f.refresh();
  }

  /** A pending card for a new flow, watched until it ends. */
  track({ flowId, kind, mode, quantity }) {
    if (!this.cards || !this.template) return;
    $("[data-empty]", this.cards)?.setAttribute("hidden", "");
    const card = this.template.content.firstElementChild.cloneNode(true);
    card.dataset.flow = flowId;
    const unit = KIND_UNITS[kind] || "";
    const titles = { deposit: "Deposit", redeem: "Redemption", faucet: "Faucet" };
    $("[data-title]", card).textContent = `${titles[kind] || "Request"} · ${formatUnits(quantity)} ${unit}`;
    const modeText = kind === "faucet" ? "test USDA" : mode === "lock" ? "v1 collateral" : "v2 custody";
    $("[data-sub]", card).textContent = `${modeText} · ${timeOfDay()}`;
    $("[data-link]", card).href = `/flows/${flowId}`;
    const stepList = $("[data-steps]", card);
    const key = `${kind}:${kind === "faucet" ? "" : mode || "deposit"}`;
    const steps = (this.data.steps[key] || []).map((s, i) => {
      const li = el("li", { class: `step ${i === 0 ? "step-active" : ""}`, "data-action": s.action },
        el("span", { class: "step-mark", "aria-hidden": "true" }), el("span", { class: "step-label", text: s.label }),
        el("span", { class: "step-time" }));
      stepList.append(li);
      return { ...s, li, done: false };
    });
    this.cards.prepend(card);
    const box = card.getBoundingClientRect();
    if (box.top < 0 || box.bottom > window.innerHeight) card.scrollIntoView({ block: "nearest", behavior: "smooth" });
    while (this.cards.querySelectorAll(".pending-card").length > 4) this.cards.querySelector(".pending-card:last-of-type").remove();
    this.addHistoryRow({ flowId, kind, mode, quantity });
    const started = performance.now();
    let hops = 0;
    const hopsLabel = $("[data-hops]", card);
    const advance = () => {
      const next = steps.find((s) => !s.done);
      for (const s of steps) s.li.classList.toggle("step-active", s === next && card.dataset.state === "pending");
    };
    watchFlow(flowId, {
      onHop: (m) => {
        hops += 1;
        hopsLabel.textContent = `${hops} hop${hops === 1 ? "" : "s"}`;
        const step = steps.find((s) => !s.done && s.action === m.action);
        const ms = Math.round(performance.now() - started);
        if (step) {
          step.done = true;
          step.li.classList.add(m.status === "failed" ? "step-failed" : "step-done");
          step.li.querySelector(".step-time").textContent = `${ms} ms`;
          if (m.status === "failed" && m.error) step.li.title = m.error;
        } else if (/-(Refunded|Failed)$/.test(m.action) || (kind === "redeem" && m.action === "Mint")) {
          // Compensation: what the coordinator did instead of the happy path.
          const extra = el("li", { class: "step step-done step-extra" },
            el("span", { class: "step-mark", "aria-hidden": "true" }),
            el("span", { class: "step-label", text: humanize(m) }), el("span", { class: "step-time", text: `${ms} ms` }));
          stepList.append(extra);
        }
        advance();
      },
      onEnd: (status, error) => {
        card.dataset.state = status;
        const chip = $("[data-status]", card);
        chip.className = `status status-${status}`;
        chip.textContent = status;
        for (const s of steps) {
          s.li.classList.remove("step-active");
          if (!s.done && status !== "completed") s.li.classList.add("step-skipped");
        }
        const result = $("[data-result]", card);
        result.hidden = false;
        error = (error || "").replace(/\.\s*$/, "");
        const amount = `${formatUnits(quantity)} ${kind === "redeem" ? "USDA" : kind === "faucet" ? "USDA" : "TIM3"}`;
        result.textContent = status === "completed"
          ? (kind === "faucet" ? `${amount} added to your wallet.` : `Done: ${amount} ${kind === "redeem" ? "paid out" : "minted"} to your wallet.`)
          : status === "refunded" ? `Refunded${error ? `: ${error}` : ""}. Your funds are back in your wallet.`
            : `Failed${error ? `: ${error}` : ""}. Nothing moved.`;
        if (status === "completed") {
          if (kind === "deposit" && mode === "lock") this.b.v1_position = (this.b.v1_position || 0n) + toBig(quantity);
          if (kind === "redeem" && mode === "lock") this.b.v1_position = (this.b.v1_position || 0n) - toBig(quantity);
          if (kind === "deposit" && this.limits.daily_left !== undefined) this.limits.daily_left -= toBig(quantity);
          if (mode !== "lock" && this.limits.payout_available !== undefined) {
            if (kind === "deposit") this.limits.payout_available += toBig(quantity);
            if (kind === "redeem") this.limits.payout_available -= toBig(quantity);
          }
        }
        this.updateHistoryRow(flowId, status, error);
        this.refreshBalances();
        this.onFlowEnded({ flowId, status });
      },
    });
    this.onFlowStarted({ flowId, kind });
  }

  addHistoryRow({ flowId, kind, mode, quantity }) {
    const body = document.getElementById("history-body");
    if (!body) return;
    body.querySelector(".empty-row")?.remove();
    const titles = { deposit: "Deposit", redeem: "Redemption", faucet: "Faucet" };
    let title = titles[kind] || "Request";
    if (kind !== "faucet") title += mode === "lock" ? " · v1 collateral" : " · v2 custody";
    const now = new Date();
    const row = el("tr", { "data-flow": flowId, class: "row-new" },
      el("td", { class: "nowrap" }, el("time", { datetime: now.toISOString(), text: now.toLocaleString([], { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", hour12: false }) })),
      el("td", { text: title }),
      el("td", { class: "num nowrap" }, `${formatUnits(quantity)} `, el("small", { text: KIND_UNITS[kind] || "" })),
      el("td", {}, el("span", { class: "status status-pending", "data-status": "pending", text: "pending" })),
      el("td", { class: "nowrap" }, el("a", { href: `/flows/${flowId}`, "aria-label": `Timeline of this ${title.toLowerCase()}`, text: "Timeline →" })),
    );
    body.prepend(row);
  }

  updateHistoryRow(flowId, status, error) {
    const row = document.querySelector(`#history-body tr[data-flow="${CSS.escape(flowId)}"]`);
    if (!row) return;
    const chip = row.querySelector("[data-status]");
    chip.className = `status status-${status}`;
    chip.dataset.status = status;
    chip.textContent = status;
    if (error && !row.querySelector("[data-flow-error]")) {
      row.children[1].append(el("div", { class: "small muted row-error", "data-flow-error": "", text: error.slice(0, 90) }));
    }
  }
}

function humanize(m) {
  if (/-Refunded$/.test(m.action)) return "Refund sent back to you";
  if (/-Failed$/.test(m.action)) return "Request refused";
  if (m.action === "Mint") return "Burned TIM3 minted back to you";
  return m.action.replace(/-/g, " ");
}

class SwapForm {
  constructor(form, wallet) {
    this.form = form;
    this.wallet = wallet;
    this.direction = form.dataset.swap;
    this.input = $('input[name$="amount"]', form);
    this.error = $("[data-error]", form);
    this.preview = $("[data-preview]", form);
    this.available = $("[data-available]", form);
    this.submit = $("[data-submit]", form);
    this.body = $("fieldset.swap-body", form);
    this.note = $("[data-disabled-note]", form);
    this.touched = Boolean(this.error && this.error.textContent.trim());
    this.key = idempotencyKey();
    this.input.addEventListener("input", () => { this.touched = true; this.key = idempotencyKey(); this.refresh(); });
    this.input.addEventListener("blur", () => { if (this.input.value.trim()) this.touched = true; this.refresh(); });
    for (const radio of $$('input[type="radio"]', form)) radio.addEventListener("change", () => { this.key = idempotencyKey(); this.refresh(); });
    $("[data-max]", form)?.addEventListener("click", () => {
      const max = this.max();
      this.input.value = max > 0n ? formatUnits(max, { grouping: false }) : "0";
      this.touched = true;
      this.key = idempotencyKey();
      this.refresh();
      this.input.focus();
    });
    form.addEventListener("submit", (e) => this.onSubmit(e));
    this.refresh();
  }

  mode() {
    const checked = $('input[type="radio"]:checked', this.form);
    return checked ? checked.value : "deposit";
  }

  max() {
    const b = this.wallet.b, l = this.wallet.limits;
    const min = (...xs) => xs.filter((x) => typeof x === "bigint").reduce((a, c) => (c < a ? c : a));
    if (this.direction === "deposit") return min(b.usda_available, l.max_amount, l.daily_left, l.hourly_left);
    if (this.mode() === "lock") return min(b.tim3, b.v1_position);
    return min(b.tim3, l.payout_available);
  }

  /** The same sentences as tim3web/forms.py amount_error. */
  problem(units) {
    const b = this.wallet.b, l = this.wallet.limits, p = this.wallet.paused;
    const reason = p.reason ? `: ${p.reason}` : "";
    if (this.direction === "deposit") {
      if (p.mint) return `Minting is paused${reason}. Deposits are disabled.`;
      if (units > b.usda_available) return `That is more than your available balance of ${formatUnits(b.usda_available)} USDA.`;
      if (l.min_amount !== undefined) {
        if (units < l.min_amount) return `The minimum per operation is ${formatUnits(l.min_amount)} TIM3.`;
        if (units > l.max_amount) return `The maximum per operation is ${formatUnits(l.max_amount)} TIM3.`;
        if (units > l.daily_left) return `Over your daily limit: ${formatUnits(l.daily_left)} TIM3 left of ${formatUnits(l.user_daily_limit)} in the last 24 hours.`;
        if (units > l.hourly_left) return `Over the system's hourly limit: ${formatUnits(l.hourly_left)} TIM3 can be minted in the next hour.`;
      }
      return null;
    }
    if (p.redeem) return `Redemptions are paused${reason}.`;
    if (units > b.tim3) return `That is more than your balance of ${formatUnits(b.tim3)} TIM3.`;
    if (this.mode() === "lock" && units > (b.v1_position ?? 0n)) return `Your v1 collateral position backs only ${formatUnits(b.v1_position ?? 0n)} TIM3.`;
    if (this.mode() === "deposit" && l.payout_available !== undefined && units > l.payout_available) return `The coordinator can pay out at most ${formatUnits(l.payout_available)} USDA right now.`;
    return null;
  }

  validate({ forSubmit = false } = {}) {
    const parsed = parseAmount(this.input.value);
    if (parsed.error) return { error: parsed.empty && !forSubmit ? null : parsed.error };
    const problem = this.problem(parsed.units);
    return problem ? { error: problem, units: parsed.units } : { units: parsed.units };
  }

  showError(message) {
    const field = this.input.closest(".swap-field");
    field.classList.toggle("has-error", Boolean(message));
    this.error.textContent = message || "";
    if (message) {
      this.input.setAttribute("aria-invalid", "true");
      this.input.setAttribute("aria-describedby", this.error.id);
    } else {
      this.input.removeAttribute("aria-invalid");
    }
  }

  refresh() {
    const b = this.wallet.b;
    if (this.available) {
      this.available.textContent = this.direction === "deposit" ? `${formatUnits(b.usda_available)} USDA` : `${formatUnits(b.tim3)} TIM3`;
    }
    const v1 = $("[data-v1-position]", this.form);
    if (v1) v1.textContent = `${formatUnits(b.v1_position ?? 0n)} TIM3`;
    const daily = $("[data-daily-left]", this.form);
    const l = this.wallet.limits;
    if (daily && l.daily_left !== undefined) daily.textContent = `${formatUnits(l.daily_left < 0n ? 0n : l.daily_left)} of ${formatUnits(l.user_daily_limit)} TIM3`;
    const result = this.validate();
    this.preview.textContent = result.units !== undefined ? formatUnits(result.units) : "0";
    if (this.touched) this.showError(result.error);
    this.applyPause();
  }

  applyPause() {
    const p = this.wallet.paused;
    const disabled = this.direction === "deposit" ? p.mint : p.redeem;
    if (this.body.disabled !== Boolean(disabled)) this.body.disabled = Boolean(disabled);
    if (this.note) {
      this.note.hidden = !disabled;
      this.note.textContent = disabled
        ? (this.direction === "deposit" ? "Deposits are disabled while minting is paused." : "Redemptions are disabled while they are paused.")
        : "";
    }
  }

  busy(on) {
    this.submit.disabled = on;
    if (on) {
      this.submitLabel = this.submit.textContent;
      this.submit.replaceChildren(el("span", { class: "spinner", "aria-hidden": "true" }), " Sending…");
    } else if (this.submitLabel) {
      this.submit.textContent = this.submitLabel;
    }
  }

  async onSubmit(e) {
    e.preventDefault();
    this.touched = true;
    const result = this.validate({ forSubmit: true });
    if (result.error) {
      this.showError(result.error);
      this.input.focus();
      return;
    }
    const mode = this.mode();
    this.busy(true);
    const path = this.direction === "deposit" ? "/api/deposits" : "/api/redemptions";
    const res = await api(path, {
      method: "POST", body: { quantity: result.units.toString(), mode }, headers: { "Idempotency-Key": this.key },
    });
    this.busy(false);
    if (res.ok && res.data && res.data.flow_id) {
      this.key = idempotencyKey();
      this.input.value = "";
      this.touched = false;
      this.showError(null);
      this.refresh();
      // Optimistic: the funds are on their way; the server's answer follows when the flow ends.
      this.wallet.track({ flowId: res.data.flow_id, kind: this.direction, mode, quantity: result.units.toString() });
      return;
    }
    if (!res.json && (res.status === 404 || res.status === 405)) {
      // No JSON API in this build: the form works without it.
      HTMLFormElement.prototype.submit.call(this.form);
      return;
    }
    if (res.network) this.showError("We could not reach the server. Check your connection and try again; nothing is sent twice.");
    else if (res.status === 403 && !res.json) this.showError("Your session expired. Reload the page and log in again.");
    else this.showError((res.data && res.data.error) || `The request was refused (HTTP ${res.status}).`);
    this.input.focus();
  }
}

class FaucetForm {
  constructor(form, wallet) {
    this.form = form;
    this.wallet = wallet;
    this.input = $('input[name="amount"]', form);
    this.error = $("[data-error]", form);
    this.submit = $("[data-submit]", form);
    this.key = idempotencyKey();
    this.input.addEventListener("input", () => { this.key = idempotencyKey(); this.show(null); });
    form.addEventListener("submit", (e) => this.onSubmit(e));
  }

  show(message) {
    this.error.textContent = message || "";
    this.input.closest(".field").classList.toggle("has-error", Boolean(message));
    if (message) this.input.setAttribute("aria-invalid", "true");
    else this.input.removeAttribute("aria-invalid");
  }

  async onSubmit(e) {
    e.preventDefault();
    const parsed = parseAmount(this.input.value);
    if (parsed.error) { this.show(parsed.error); this.input.focus(); return; }
    this.submit.disabled = true;
    const res = await api("/api/faucet", {
      method: "POST", body: { quantity: parsed.units.toString() }, headers: { "Idempotency-Key": this.key },
    });
    this.submit.disabled = false;
    if (res.ok && res.data && res.data.flow_id) {
      this.key = idempotencyKey();
      this.show(null);
      this.wallet.track({ flowId: res.data.flow_id, kind: "faucet", mode: "", quantity: parsed.units.toString() });
      return;
    }
    if (!res.json && (res.status === 404 || res.status === 405)) {
      HTMLFormElement.prototype.submit.call(this.form);
      return;
    }
    this.show(res.network ? "We could not reach the server. Try again." : (res.data && res.data.error) || `Refused (HTTP ${res.status}).`);
  }
}
