"""The whole user journey in a real browser against a live server with real delivery.

Sign up, use the faucet, deposit 25.5 USDA and watch the pending card tick off as
the websocket delivers the hops, see balances change without a reload, redeem 10,
find the flow in the history and open its timeline; watch the live diagram and a
replay, survive a synthetic burst of hops; an admin pauses minting (the user sees
the banner and a disabled deposit form, and can still redeem) and resumes.
Screenshots of every page and state, desktop (1280) and phone (390), go to
test-artifacts/screenshots/. No console errors are allowed anywhere.
"""

import json
import re
import time

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import ADMIN

pytestmark = pytest.mark.browser

DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
PASSWORD = "sunny-ledger-9917"


class Watch:
    """Console errors and websocket frames of every page we open."""

    def __init__(self):
        self.errors: list[str] = []
        self.frames: list[dict] = []

    def page(self, context, name):
        page = context.new_page()
        page.on("console", lambda m: self.errors.append(f"{name}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"{name}: uncaught {e}"))
        page.on("websocket", lambda ws: ws.on("framereceived", self._frame))
        return page

    def _frame(self, payload):
        try:
            self.frames.append(json.loads(payload))
        except (TypeError, ValueError):
            pass

    def hops_of(self, flow_id):
        return [f for f in self.frames if f.get("type") == "hop" and f.get("flow") == flow_id]


def shot(page, directory, name):
    page.evaluate("window.scrollTo(0, 0)")  # a sticky header is drawn where the page is scrolled to
    page.screenshot(path=str(directory / f"{name}.png"), full_page=True)


def phone_shots(browser, state, base, directory, watch, pages):
    context = browser.new_context(viewport=PHONE, device_scale_factor=2, storage_state=state)
    page = watch.page(context, "phone")
    for name, path in pages:
        page.goto(base + path)
        page.wait_for_load_state("networkidle")
        width = page.evaluate("document.documentElement.scrollWidth")
        wide = page.evaluate("""() => [...document.querySelectorAll('body *')]
            .filter((e) => e.getBoundingClientRect().right > 391)
            .map((e) => `${e.tagName}.${e.className} ${Math.round(e.getBoundingClientRect().right)}`).slice(0, 12)""")
        assert width <= PHONE["width"], f"{path} is {width}px wide on a 390px phone: {wide}"
        shot(page, directory, f"phone-{name}")
    context.close()


def card(page, flow_id):
    return page.locator(f'.pending-card[data-flow="{flow_id}"]')


def submit_and_wait(page, panel, amount, watch):
    """Type an amount in a swap box, submit it, wait for its pending card to finish; return the flow id."""
    page.fill(f"#{panel} input[name$='amount']", amount)
    before = page.locator(".pending-card").count()
    page.click(f"#{panel} [data-submit]")
    expect(page.locator(".pending-card")).to_have_count(before + 1)
    flow_id = page.locator(".pending-card").first.get_attribute("data-flow")
    expect(card(page, flow_id)).to_have_attribute("data-state", "completed", timeout=20_000)
    return flow_id


def test_wallet_journey(live_server_url, browser, screenshots):
    base = live_server_url
    watch = Watch()
    username = f"dana{int(time.time()) % 100000}"
    desktop = browser.new_context(viewport=DESKTOP)
    page = watch.page(desktop, "desktop")

    # --- first visit, sign up ------------------------------------------------------------
    page.goto(base + "/")
    expect(page.locator("#diagram")).to_be_visible()
    expect(page.locator("[data-live-state]").first).to_have_attribute("data-state", "live")
    shot(page, screenshots, "desktop-home-anonymous")
    page.goto(base + "/login")
    shot(page, screenshots, "desktop-login")
    page.click("text=Create an account")
    page.fill("#id_username", username)
    page.fill("#id_password1", PASSWORD)
    page.fill("#id_password2", "not-the-same-1")
    page.click("form button[type=submit]")
    expect(page.locator("#id_password2_error")).to_contain_text("The two passwords do not match.")
    shot(page, screenshots, "desktop-signup-error")
    page.fill("#id_password1", PASSWORD)
    page.fill("#id_password2", PASSWORD)
    page.click("form button[type=submit]")
    page.wait_for_url("**/wallet")
    expect(page.locator("#balances [data-balance='usda_available']")).to_have_text("0")
    shot(page, screenshots, "desktop-wallet-new")
    page.evaluate("window.__sameDocument = true")  # gone if the page reloads

    # --- faucet ----------------------------------------------------------------------------
    page.click("form[data-faucet] [data-submit]")
    faucet_flow = page.locator(".pending-card").first.get_attribute("data-flow")
    expect(card(page, faucet_flow)).to_have_attribute("data-state", "completed", timeout=20_000)
    expect(page.locator("#balances [data-balance='usda_available']")).to_have_text("1,000")

    # --- inline validation -------------------------------------------------------------------
    amount = page.locator("#id_deposit-amount")
    amount.fill("abc")
    expect(page.locator("#deposit-panel [data-error]")).to_contain_text("Enter an amount like 25 or 25.5")
    amount.fill("5000")
    expect(page.locator("#deposit-panel [data-error]")).to_contain_text("more than your available balance of 1,000 USDA")
    amount.fill("0.5")
    expect(page.locator("#deposit-panel [data-error]")).to_contain_text("The minimum per operation is 1 TIM3.")
    page.click("#deposit-panel [data-max]")
    expect(amount).to_have_value("1000")
    amount.fill("25.5")
    expect(page.locator("#deposit-panel [data-error]")).to_have_text("")
    expect(page.locator("#deposit-panel [data-preview]")).to_have_text("25.5")
    shot(page, screenshots, "desktop-wallet-deposit-typed")

    # --- deposit 25.5: the card ticks off as hops arrive on the websocket ---------------------
    # The card opens its flow's socket once the POST has answered; a fast server may have
    # finished the flow by then, and the card catches up from the API. So that this test
    # sees the websocket deliver the hops, a second tab is already streaming every flow
    # (the home page's live diagram) when the deposit starts.
    streaming = watch.page(desktop, "desktop-stream")
    streaming.goto(base + "/")
    expect(streaming.locator("[data-live-state]").first).to_have_attribute("data-state", "live")
    page.bring_to_front()
    page.click("#deposit-panel [data-submit]")
    expect(page.locator(".pending-card")).to_have_count(2)
    deposit_flow = page.locator(".pending-card").first.get_attribute("data-flow")
    deposit_card = card(page, deposit_flow)
    expect(deposit_card).to_have_attribute("data-state", "completed", timeout=20_000)
    expect(deposit_card.locator(".step.step-done")).to_have_count(5)
    expect(deposit_card.locator("[data-result]")).to_have_text("Done: 25.5 TIM3 minted to your wallet.")
    ended = lambda: any(f.get("type") == "flow" and f.get("flow") == deposit_flow  # noqa: E731
                        and f.get("status") == "completed" for f in watch.frames)
    for _ in range(200):  # Playwright hands frames over while it waits: give it up to 10 s
        if watch.hops_of(deposit_flow) and ended():
            break
        page.wait_for_timeout(50)
    assert watch.hops_of(deposit_flow), "no hop of the deposit arrived over the websocket"
    assert ended(), "the flow's end did not arrive over the websocket"
    streaming.close()
    expect(page.locator("#balances [data-balance='tim3']")).to_have_text("25.5")
    expect(page.locator("#balances [data-balance='usda_available']")).to_have_text("974.5")
    shot(page, screenshots, "desktop-wallet-deposit-completed")

    # --- redeem 10 --------------------------------------------------------------------------------
    redeem_flow = submit_and_wait(page, "redeem-panel", "10", watch)
    expect(card(page, redeem_flow).locator(".step.step-done")).to_have_count(5)
    expect(page.locator("#balances [data-balance='tim3']")).to_have_text("15.5")
    expect(page.locator("#balances [data-balance='usda_available']")).to_have_text("984.5")
    assert page.evaluate("window.__sameDocument") is True, "the wallet page reloaded"
    for flow_id in (faucet_flow, deposit_flow, redeem_flow):
        expect(page.locator(f'#history-body tr[data-flow="{flow_id}"] [data-status]')).to_have_text("completed")
    shot(page, screenshots, "desktop-wallet-after-redeem")

    # --- the history survives a reload; the timeline page ---------------------------------------------
    page.reload()
    expect(page.locator(f'#history-body tr[data-flow="{deposit_flow}"]')).to_contain_text("Deposit · v2 custody")
    page.click(f'#history-body tr[data-flow="{deposit_flow}"] a')
    page.wait_for_url(f"**/flows/{deposit_flow}")
    expect(page.locator("h1")).to_have_text(re.compile(r"Deposit · v2 custody · 25\.5 USDA"))
    expect(page.locator(".tl-row")).to_have_count(8)
    for action in ("Transfer", "Credit-Notice", "Mint", "UpdatePosition", "Deposit-Complete"):
        expect(page.locator(".tl-action", has_text=re.compile(f"^{action}$")).first).to_be_visible()
    shot(page, screenshots, "desktop-flow-timeline")
    page.click(".tl-action >> text=Mint")
    page.wait_for_url("**/explorer/messages/**")
    expect(page.locator("h2", has_text="Tags")).to_be_visible()
    shot(page, screenshots, "desktop-explorer-message")

    # --- the live diagram, replay and a burst -----------------------------------------------------------
    page.goto(base + "/")
    expect(page.locator("[data-live-state]").first).to_have_attribute("data-state", "live")
    page.fill("#id_deposit-amount", "5")
    page.click("#deposit-panel [data-submit]")
    page.wait_for_selector(".hops-layer g[visibility='visible']", timeout=10_000)
    shot(page, screenshots, "desktop-home-live-hop")
    home_flow = page.locator(".pending-card").first.get_attribute("data-flow")
    expect(card(page, home_flow)).to_have_attribute("data-state", "completed", timeout=20_000)
    expect(page.locator("[data-balance='tim3']").first).to_have_text("20.5")
    assert int(page.locator("[data-total]").inner_text().replace(",", "")) >= 5
    page.check("input[name='diagram-filter'][value='mine']", force=True)
    page.select_option("#replay-flow", deposit_flow)
    page.select_option("#replay-speed", "2")
    page.click("[data-replay] button[type=submit]")
    expect(page.locator("[data-replay-text]")).to_contain_text("Replaying", timeout=10_000)
    page.wait_for_selector(".hops-layer .hop-dot.replay", timeout=10_000)
    shot(page, screenshots, "desktop-home-replay")
    page.click("[data-replay-stop]")
    page.check("input[name='diagram-filter'][value='all']", force=True)

    # A dropped connection: the stream reconnects and fetches what it missed by slot (CONTRACT).
    reconnect = page.evaluate("""async () => {
        const { stream, diagram } = window.tim3Live;
        const usda = [...diagram.processNode.entries()].find(([, node]) => node === "usda")[0];
        const before = diagram.total;
        stream.slots[usda] = Math.max(0, stream.slots[usda] - 4);  // as if the last hops to USDA were missed
        stream.socket.close();
        await new Promise((r) => setTimeout(r, 2500));
        return {caught: diagram.total - before, state: document.querySelector("[data-live-state]").dataset.state};
    }""")
    assert reconnect["state"] == "live" and reconnect["caught"] >= 1, reconnect

    burst = page.evaluate("""async () => {
        const d = window.tim3Live.diagram;
        const ids = [...d.processNode.keys()];
        const seenBefore = d.total;
        const t0 = performance.now();
        for (let i = 0; i < 3000; i++) {
            d.push({flow: "burst", message: {id: "burst" + i, from: ids[i % ids.length],
                    target: ids[(i + 1) % ids.length], action: "Burst", status: i % 50 ? "applied" : "failed"}});
        }
        const pushMs = performance.now() - t0;
        let last = performance.now(), maxGap = 0, maxActive = 0;
        await new Promise((done) => {
            const end = last + 1500;
            const frame = (now) => {
                maxGap = Math.max(maxGap, now - last); last = now;
                maxActive = Math.max(maxActive, document.querySelectorAll(".hops-layer g[visibility='visible']").length);
                if (now < end) requestAnimationFrame(frame); else done();
            };
            requestAnimationFrame(frame);
        });
        return {counted: d.total - seenBefore, pushMs, maxGap, maxActive};
    }""")
    assert burst["counted"] == 3000
    assert burst["maxActive"] <= 12, burst
    assert burst["pushMs"] < 500 and burst["maxGap"] < 250, f"the page stalled under a burst: {burst}"
    expect(page.locator("[data-dropped]")).to_contain_text("counted but not drawn")
    shot(page, screenshots, "desktop-home-after-burst")

    # --- explorer ------------------------------------------------------------------------------------
    page.goto(base + "/explorer")
    shot(page, screenshots, "desktop-explorer")
    page.fill("#explorer-q", "coordinator")
    page.press("#explorer-q", "Enter")
    page.wait_for_url("**/explorer/processes/**")
    expect(page.locator("h1")).to_have_text("coordinator")
    shot(page, screenshots, "desktop-explorer-process")
    page.select_option("#f-action", "RedeemTIM3")
    page.click(".filter-form button[type=submit]")
    expect(page.locator(".msg-table tbody tr")).to_have_count(1)
    page.goto(base + "/explorer?q=" + username)
    page.wait_for_url("**/explorer/addresses/**")
    shot(page, screenshots, "desktop-explorer-address")
    page.goto(base + "/explorer?q=nothing-like-this")
    expect(page.locator(".empty-state")).to_contain_text("Nothing found")

    state = desktop.storage_state()
    phone_shots(browser, state, base, screenshots, watch, [
        ("home", "/"), ("wallet", "/wallet"), ("flow-timeline", f"/flows/{deposit_flow}"), ("explorer", "/explorer"),
        ("explorer-process", "/explorer/processes/usda"), ("explorer-message", f"/explorer/messages/{deposit_flow}"),
        ("explorer-address", f"/explorer?q={username}"),
    ])
    phone_shots(browser, None, base, screenshots, watch, [("home-anonymous", "/"), ("signup", "/signup"),
                                                          ("login", "/login")])

    # --- an admin pauses minting; the user's open wallet page follows -----------------------------------------
    page.goto(base + "/wallet")
    admin_context = browser.new_context(viewport=DESKTOP)
    admin = watch.page(admin_context, "admin")
    admin.goto(base + "/login?next=/ops")
    admin.fill("#id_username", ADMIN[0])
    admin.fill("#id_password", ADMIN[1])
    admin.click("form button[type=submit]")
    admin.wait_for_url("**/ops")
    shot(admin, screenshots, "desktop-ops")
    admin.check("#pause input[value='mint']")
    admin.click("#pause button[type=submit]")  # no reason: refused
    expect(admin.locator("#pause .errorlist")).to_contain_text("This field is required.")
    admin.fill("#id_reason", "Scheduled custody audit")
    admin.click("#pause button:has-text('Pause now')")
    admin.wait_for_url("**/ops")
    expect(admin.locator(".flash")).to_contain_text("Pause (mint) sent")
    expect(admin.locator("#audit")).to_contain_text("pause")
    shot(admin, screenshots, "desktop-ops-paused")

    banner = page.locator("#pause-banner")
    expect(banner).to_be_visible(timeout=20_000)  # the wallet polls the system's health
    expect(banner).to_contain_text("Scheduled custody audit")
    expect(page.locator("#id_deposit-amount")).to_be_disabled()
    expect(page.locator("#id_redeem-amount")).to_be_enabled()
    page.reload()
    expect(banner).to_contain_text("Minting is paused: deposits are disabled, redemptions still work")
    expect(banner).to_contain_text(f"Paused by {ADMIN[0]}")
    expect(page.locator("#id_deposit-amount")).to_be_disabled()
    expect(page.locator("#deposit-panel [data-disabled-note]")).to_be_visible()
    shot(page, screenshots, "desktop-wallet-paused")
    phone_shots(browser, desktop.storage_state(), base, screenshots, watch, [("wallet-paused", "/wallet")])
    paused_redeem = submit_and_wait(page, "redeem-panel", "5", watch)
    expect(page.locator("#balances [data-balance='tim3']")).to_have_text("15.5")
    assert paused_redeem
    page.goto(base + "/")
    expect(page.locator("[data-badge='paused']")).to_have_attribute("visibility", "visible", timeout=10_000)
    shot(page, screenshots, "desktop-home-paused")

    # --- resume ---------------------------------------------------------------------------------------------
    page.goto(base + "/wallet")
    admin.check("#id_scope_2" if admin.locator("#id_scope_2").count() else "input[value='all']")
    admin.click("button:has-text('Resume')")
    expect(admin.locator(".flash")).to_contain_text("Resume (all) sent")
    expect(banner).to_be_hidden(timeout=20_000)
    expect(page.locator("#id_deposit-amount")).to_be_enabled()
    admin.goto(base + "/ops#audit")
    expect(admin.locator("#audit")).to_contain_text("resume")
    shot(admin, screenshots, "desktop-ops-resumed")
    phone_shots(browser, admin_context.storage_state(), base, screenshots, watch, [("ops", "/ops")])

    # --- a deposit the coordinator refuses is refunded, and the card says why -----------------------------------
    admin.goto(base + "/ops")
    admin.fill("#id_MaxAmount", "2")
    admin.click("#limits button[type=submit]")
    expect(admin.locator(".flash")).to_contain_text("MaxAmount")
    page.fill("#id_deposit-amount", "3")  # the page still knows the old limits: the coordinator decides
    page.click("#deposit-panel [data-submit]")
    refunded = page.locator(".pending-card").first
    expect(refunded).to_have_attribute("data-state", "refunded", timeout=20_000)
    expect(refunded.locator("[data-result]")).to_contain_text("Amount is above the maximum of 2 TIM3 per operation")
    expect(refunded.locator(".step-extra")).to_contain_text("Refund sent back to you")
    expect(page.locator("#balances [data-balance='usda_available']")).to_have_text("984.5")
    shot(page, screenshots, "desktop-wallet-refunded")
    refunded_flow = refunded.get_attribute("data-flow")
    page.goto(f"{base}/flows/{refunded_flow}")
    expect(page.locator(".alert")).to_contain_text("Refunded:")
    shot(page, screenshots, "desktop-flow-refunded")
    admin.fill("#id_MaxAmount", "100000")
    admin.click("#limits button[type=submit]")
    expect(admin.locator(".flash")).to_contain_text("MaxAmount")

    # --- the system check from the operations page (it pauses and resumes, so it runs last) ---------------------
    admin.goto(base + "/ops")
    admin.click("button:has-text('Run system check')")
    expect(admin.locator(".check-output")).to_contain_text("failed", timeout=60_000)
    expect(admin.locator(".check-output")).to_contain_text(" 0 failed")
    expect(admin.locator("#system-check .status")).to_have_text("passed")
    shot(admin, screenshots, "desktop-ops-system-check")

    # --- a user who is not staff gets a clear 403 on /ops -----------------------------------------------------------
    response = page.goto(base + "/ops")
    assert response.status == 403
    expect(page.locator("h1")).to_have_text("You don't have access to this page")
    watch.errors = [e for e in watch.errors if "status of 403" not in e]  # that 403 was the point
    shot(page, screenshots, "desktop-403")

    assert watch.errors == [], "console errors:\n" + "\n".join(watch.errors)
    admin_context.close()
    desktop.close()
