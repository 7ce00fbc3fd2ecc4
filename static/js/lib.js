// Small shared helpers: DOM, CSRF-aware JSON calls, exact token amounts (BigInt).

export const $ = (sel, root = document) => root.querySelector(sel);
export const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));

export const DENOMINATION = 6;
const UNIT = 10n ** BigInt(DENOMINATION);
const MAX_QUANTITY = 10n ** 18n;

export function csrfToken() {
  const match = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
  if (match) return decodeURIComponent(match[1]);
  const input = document.querySelector("input[name=csrfmiddlewaretoken]");
  return input ? input.value : "";
}

export function idempotencyKey() {
  if (window.crypto && typeof window.crypto.randomUUID === "function") return window.crypto.randomUUID();
  const bytes = new Uint8Array(16);
  window.crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** fetch JSON; never throws: {ok, status, data, network} */
export async function api(path, { method = "GET", body, headers = {} } = {}) {
  const init = { method, headers: { Accept: "application/json", ...headers }, credentials: "same-origin" };
  if (method !== "GET") {
    init.headers["X-CSRFToken"] = csrfToken();
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
  }
  try {
    const response = await fetch(path, init);
    let data = null;
    const type = response.headers.get("Content-Type") || "";
    if (type.includes("json")) {
      try { data = await response.json(); } catch { data = null; }
    }
    return { ok: response.ok, status: response.status, data, json: data !== null };
  } catch (error) {
    return { ok: false, status: 0, data: null, json: false, network: true };
  }
}

export function toBig(value) {
  try { return BigInt(value ?? 0); } catch { return 0n; }
}

/** base units -> "1,234.5" */
export function formatUnits(value, { grouping = true } = {}) {
  let q = toBig(value);
  const negative = q < 0n;
  if (negative) q = -q;
  const whole = q / UNIT;
  const frac = q % UNIT;
  let text = grouping ? whole.toString().replace(/\B(?=(\d{3})+(?!\d))/g, ",") : whole.toString();
  if (frac) text += "." + frac.toString().padStart(DENOMINATION, "0").replace(/0+$/, "");
  return (negative ? "-" : "") + text;
}

/** "25.5" -> {units: 25500000n} or {error}; the same rules as parse_token_amount on the server. */
export function parseAmount(text) {
  const t = (text || "").trim().replace(/,/g, "");
  if (!t) return { error: "Enter an amount.", empty: true };
  if (!/^[0-9]+(\.[0-9]{1,6})?$/.test(t)) return { error: "Enter an amount like 25 or 25.5 (at most 6 decimals)." };
  const [whole, frac = ""] = t.split(".");
  const units = BigInt(whole) * UNIT + BigInt((frac || "0").padEnd(DENOMINATION, "0"));
  if (units <= 0n) return { error: "Enter an amount above zero." };
  if (units > MAX_QUANTITY) return { error: "That amount is above the maximum for one operation." };
  return { units };
}

export function shortId(id, n = 8) {
  id = String(id || "");
  return id.length > n + 1 ? id.slice(0, n) + "…" : id;
}

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

export function timeOfDay(date = new Date()) {
  return date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
}

export function debounce(fn, ms) {
  let timer = null;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}

export function readJSON(id) {
  const node = document.getElementById(id);
  if (!node) return null;
  try { return JSON.parse(node.textContent); } catch { return null; }
}

export function wsURL(path) {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  return `${scheme}://${location.host}${path}`;
}

export function setLiveState(state) {
  for (const node of $$("[data-live-state]")) {
    node.dataset.state = state;
    node.textContent = state === "live" ? "live" : state === "reconnecting" ? "reconnecting…" : state;
  }
}

export function initCopyButtons(root = document) {
  for (const button of $$("[data-copy]", root)) {
    button.addEventListener("click", async () => {
      const original = button.textContent;
      try {
        await navigator.clipboard.writeText(button.dataset.copy);
        button.textContent = "Copied";
      } catch {
        button.textContent = "Select and copy";
      }
      setTimeout(() => { button.textContent = original; }, 1400);
    });
  }
}
