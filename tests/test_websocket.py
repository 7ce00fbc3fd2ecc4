"""WebSocket /ws/flows/ (CONTRACT): hop and flow events through the real ASGI application.

The consumer runs in the test's event loop (WebsocketCommunicator); delivery
runs the workers' drain (`run_until_idle`) in a worker thread, exactly as in
embedded mode, so events reach the socket the production way: committed,
`messages_settled` / `flows_ended` after commit, `events.publish`, the
publisher in the server's loop, channel layer, the process's hub, socket.
These tests use the in-memory layer on every backend (it is the one `make run`
uses); the transaction=True database makes the commits real.
"""

import asyncio
import json

import pytest
from asgiref.sync import sync_to_async
from channels.layers import channel_layers
from channels.testing import WebsocketCommunicator
from django.db import connections
from django.test import Client

from processes import actions
from processes.flows import Flow
from processes.runtime.delivery import run_until_idle
from processes.runtime.models import Message, Process
from processes.runtime.quantities import UNIT
from tim3web import events, fanout
from tim3web.asgi import application
from tim3web.fanout import hub

pytestmark = pytest.mark.django_db(transaction=True)

U = UNIT
ORIGIN = [(b"origin", b"http://127.0.0.1")]
MESSAGE_KEYS = {"id", "from", "target", "action", "tags", "data", "slot", "reference", "x_reference",
                "pushed_for", "parent", "status", "error", "timestamp"}
WAIT = 5  # seconds for one event; they normally arrive in milliseconds


@pytest.fixture(autouse=True)
def _memory_layer(settings):
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    channel_layers.backends.clear()
    events._server = None  # the next consumer to connect starts a publisher in this test's loop
    yield
    events._server = None
    channel_layers.backends.clear()


@pytest.fixture(autouse=True)
async def _close_thread_connections():
    yield
    # The worker thread's connections: close them so nothing holds the test database open.
    await sync_to_async(connections.close_all)()


def in_thread(fn, *args, **kwargs):
    """Run database work the way a worker does: in a thread, committing for real."""
    return sync_to_async(fn)(*args, **kwargs)


async def watch(path: str = "/ws/flows/") -> WebsocketCommunicator:
    comm = WebsocketCommunicator(application, path, headers=ORIGIN)
    connected, _ = await comm.connect()
    assert connected, path
    return comm


async def receive(comm: WebsocketCommunicator, count: int) -> list[dict]:
    """Exactly `count` events, then silence."""
    got = [await comm.receive_json_from(timeout=WAIT) for _ in range(count)]
    assert await comm.receive_nothing(timeout=0.2), "more events than messages"
    return got


def settled(**filters) -> list[Message]:
    return list(Message.objects.filter(**filters).exclude(status=Message.PENDING).order_by("seq"))


def process_ids() -> set[str]:
    return set(Process.objects.values_list("id", flat=True))


def settle_faucet(who: str, quantity: int) -> Flow:
    flow = actions.request_faucet(wallet=who, quantity=str(quantity))
    run_until_idle()
    flow.refresh_from_db()
    return flow


def settle(flow: Flow) -> Flow:
    run_until_idle()
    flow.refresh_from_db()
    return flow


def hops_in_order(got: list[dict]) -> list[dict]:
    return [e["message"] for e in got if e["type"] == "hop"]


def assert_per_process_slot_order(messages: list[dict], targets: set[str]) -> None:
    """Within each process, events come in slot order with no gap."""
    by_process: dict[str, list[int]] = {}
    for m in messages:
        if m["target"] in targets:
            by_process.setdefault(m["target"], []).append(m["slot"])
    for slots in by_process.values():
        assert slots == list(range(slots[0], slots[0] + len(slots))), slots


# --- a flow, hop by hop -----------------------------------------------------------------


async def test_deposit_hops_arrive_once_in_slot_order_then_the_flow_event(system, wallet):
    user = wallet()
    everything = await watch()  # the all-flows stream, from before the faucet
    faucet = await in_thread(settle_faucet, user, 200 * U)
    assert faucet.status == Flow.COMPLETED
    faucet_events = await receive(everything, len(await in_thread(settled, pushed_for=faucet.id)) + 1)

    flow = await in_thread(actions.request_deposit, wallet=user, quantity=str(100 * U))
    one = await watch(f"/ws/flows/{flow.id}/")
    flow = await in_thread(settle, flow)
    assert flow.status == Flow.COMPLETED

    rows = await in_thread(settled, pushed_for=flow.id)
    targets = await in_thread(process_ids)
    assert len(rows) >= 7  # Transfer, notices, Mint, UpdatePosition and their answers, Deposit-Complete
    assert any(r.target == user for r in rows) and any(r.target in targets for r in rows)

    for comm in (one, everything):
        got = await receive(comm, len(rows) + 1)
        hops = hops_in_order(got)
        # Every settled message of the flow, exactly once, with the CONTRACT shape and the DB's values.
        assert sorted(m["id"] for m in hops) == sorted(r.msg_id for r in rows)
        by_id = {r.msg_id: r for r in rows}
        for event in got[:-1]:
            assert event["type"] == "hop" and event["flow"] == flow.id
            m = event["message"]
            assert set(m) == MESSAGE_KEYS
            row = by_id[m["id"]]
            assert (m["from"], m["target"], m["action"], m["slot"], m["status"], m["pushed_for"], m["parent"]) == (
                row.sender, row.target, row.action, row.slot, row.status, flow.id, row.parent_id)
            assert m["status"] in ("applied", "failed")
            assert isinstance(m["tags"], dict) and m["tags"]["Action"] == m["action"]
            assert m["error"] is None and isinstance(m["timestamp"], int) and m["reference"] == str(row.reference)
            assert (m["slot"] is None) == (m["target"] not in targets)
        assert_per_process_slot_order(hops, targets)
        # The flow's end comes after its last hop.
        assert got[-1]["type"] == "flow"
        assert (got[-1]["flow"], got[-1]["status"]) == (flow.id, "completed")

    # The all-flows stream saw the faucet flow too (the flow's own socket was not open yet).
    assert faucet_events[-1] == {"type": "flow", "flow": faucet.id, "status": "completed", "error": None}
    assert all(e["flow"] == faucet.id for e in faucet_events)
    await one.disconnect()
    await everything.disconnect()


# --- one stream, filtered per socket ----------------------------------------------------------

FLOW_A, FLOW_B = "A" * 43, "B" * 43


def hop(flow: str, n: int) -> dict:
    return {"type": "hop", "flow": flow, "message": {"id": f"{flow[0]}{n}"}, "committed_at": n}


def end(flow: str) -> dict:
    return {"type": "flow", "flow": flow, "status": "completed", "error": None}


async def test_a_flow_socket_gets_only_its_flow_in_order_with_the_end_last(monkeypatch):
    everything, a, b = await watch(), await watch(f"/ws/flows/{FLOW_A}/"), await watch(f"/ws/flows/{FLOW_B}/")
    layer = channel_layers["default"]
    sends = []
    group_send = layer.group_send

    async def counted(group, message):
        sends.append(len(message["events"]))
        await group_send(group, message)

    monkeypatch.setattr(layer, "group_send", counted)
    drains = [[hop(FLOW_A, 1), hop(FLOW_B, 1), hop(FLOW_A, 2)], [hop(FLOW_B, 2), end(FLOW_B)],
              [hop(FLOW_A, 3)], [end(FLOW_A)]]
    for batch in drains:  # published from a worker thread, one call per drain, as delivery does
        await in_thread(events.publish, batch)
    published = [e for batch in drains for e in batch]

    assert await receive(everything, len(published)) == published
    assert await receive(a, 4) == [hop(FLOW_A, 1), hop(FLOW_A, 2), hop(FLOW_A, 3), end(FLOW_A)]
    assert await receive(b, 3) == [hop(FLOW_B, 1), hop(FLOW_B, 2), end(FLOW_B)]
    # One layer message per publish at most (coalesced when they queue up), and one member in
    # one group: this process's hub. No socket has a channel or a flow group of its own.
    assert 1 <= len(sends) <= len(drains) and sum(sends) == len(published)
    assert list(layer.groups) == [events.ALL_HOPS] and len(layer.groups[events.ALL_HOPS]) == 1
    for comm in (everything, a, b):
        await comm.disconnect()

    # Closed sockets are forgotten; a new one streams.
    assert not hub().everything and not hub().by_flow
    again = await watch()
    await in_thread(events.publish, [hop(FLOW_B, 3)])
    assert await receive(again, 1) == [hop(FLOW_B, 3)]
    await again.disconnect()


async def test_the_hub_joins_again_when_the_layer_forgot_its_group(monkeypatch):
    # What a Redis restarted empty (or a day-old membership expiring) does to the hub.
    monkeypatch.setattr(fanout, "REJOIN_SECONDS", 0.05)
    comm = await watch()
    channel_layers["default"].groups.clear()
    await asyncio.sleep(0.2)
    await in_thread(events.publish, [hop(FLOW_A, 1)])
    assert await receive(comm, 1) == [hop(FLOW_A, 1)]
    await comm.disconnect()


# --- a failed hop ------------------------------------------------------------------------


async def test_a_failed_hop_is_streamed_with_its_error(system, wallet):
    alice, bob = wallet(), wallet()
    for who in (alice, bob):
        await in_thread(settle_faucet, who, 200 * U)
    await in_thread(lambda: settle(actions.request_deposit(wallet=alice, quantity=str(100 * U))))
    await in_thread(lambda: settle(actions.request_deposit(wallet=bob, quantity=str(50 * U))))

    flow = await in_thread(actions.request_redemption, wallet=bob, quantity=str(80 * U))  # holds 50 TIM3
    comm = await watch(f"/ws/flows/{flow.id}/")
    flow = await in_thread(settle, flow)
    assert flow.status == Flow.FAILED
    rows = await in_thread(settled, pushed_for=flow.id)
    got = await receive(comm, len(rows) + 1)

    failed = [m for m in hops_in_order(got) if m["status"] == "failed"]
    assert [(m["action"], m["error"]) for m in failed] == [("Burn", "Insufficient balance: 50 available, 80 needed.")]
    assert set(failed[0]) == MESSAGE_KEYS and isinstance(failed[0]["slot"], int)
    assert [m["action"] for m in hops_in_order(got)] == [r.action for r in rows]
    assert got[-1] == {"type": "flow", "flow": flow.id, "status": "failed",
                       "error": "Insufficient balance: 50 available, 80 needed."}
    await comm.disconnect()


# --- a client that was away --------------------------------------------------------------


def catch_up(client: Client, process: str, after: int) -> list[dict]:
    """GET /api/messages?process=&after_slot= page by page, the way a client fills a gap."""
    out = []
    while True:
        response = client.get("/api/messages", {"process": process, "after_slot": after, "limit": 20})
        assert response.status_code == 200, response.content
        page = response.json()["results"]
        out += page
        if not page:
            return out
        after = page[-1]["slot"]


def newest_slots(client: Client) -> dict[str, int]:
    """Where each process's log stands: what a client reads once before it watches."""
    slots = {}
    for p in client.get("/api/processes").json()["results"]:
        newest = client.get("/api/messages", {"process": p["id"], "limit": 1}).json()["results"]
        slots[p["id"]] = newest[0]["slot"] if newest else 0
    return slots


def settled_nothing_pending() -> bool:
    return Message.objects.filter(status=Message.PENDING).exists()


def log_since(start: dict[str, int]) -> dict[str, list[tuple[int, str]]]:
    return {p: list(Message.objects.filter(target=p, slot__gt=after).order_by("slot").values_list("slot", "msg_id"))
            for p, after in start.items()}


async def test_a_reconnecting_client_catches_up_through_the_api_without_gaps_or_duplicates(system, wallet):
    alice, bob = wallet(), wallet()
    client = Client()
    assert not await in_thread(settled_nothing_pending)
    start = await in_thread(newest_slots, client)
    seen: list[tuple[str, int, str]] = []  # (process, slot, message id) in the order the client got them
    last = dict(start)

    def note(messages):
        for m in messages:
            if m["target"] in start:
                assert m["slot"] == last[m["target"]] + 1, "a gap on the socket"
                last[m["target"]] = m["slot"]
                seen.append((m["target"], m["slot"], m["id"]))

    # Connected: the faucet flows, but the client reads only part of the second one before it drops.
    comm = await watch()
    faucets = [await in_thread(settle_faucet, who, 300 * U) for who in (alice, bob)]
    published = sum([len(await in_thread(settled, pushed_for=f.id)) + 1 for f in faucets])
    got = [await comm.receive_json_from(timeout=WAIT) for _ in range(published - 3)]  # not the last hops
    note(hops_in_order(got))
    assert seen
    await comm.disconnect()

    # Away: deposits and redemptions (one of them failing) settle and stream to nobody.
    def away():
        for who, q in ((alice, 150), (bob, 100)):
            assert settle(actions.request_deposit(wallet=who, quantity=str(q * U))).status == Flow.COMPLETED
        assert settle(actions.request_redemption(wallet=alice, quantity=str(40 * U))).status == Flow.COMPLETED
        assert settle(actions.request_redemption(wallet=bob, quantity=str(999 * U))).status == Flow.FAILED
        assert settle(actions.request_deposit(wallet=alice, quantity=str(10 * U), mode="lock")).status == Flow.COMPLETED
    await in_thread(away)

    # Back: watch first, then fill each process's gap from the API, then keep following the socket.
    comm = await watch()
    for process in start:
        note(await in_thread(catch_up, client, process, last[process]))
    flow = await in_thread(lambda: settle(actions.request_redemption(wallet=bob, quantity=str(30 * U))))
    assert flow.status == Flow.COMPLETED
    rows = await in_thread(settled, pushed_for=flow.id)
    note(hops_in_order(await receive(comm, len(rows) + 1)))
    await comm.disconnect()

    log = await in_thread(log_since, start)
    assert sum(map(len, log.values())) > len(rows) + 20  # the away part was a real gap
    assert len(seen) == len(set(seen)), "duplicated"
    assert sorted(seen) == sorted((p, slot, msg_id) for p, entries in log.items() for slot, msg_id in entries)
    for p, entries in log.items():
        assert [slot for slot, _ in entries] == list(range(start[p] + 1, last[p] + 1))


# --- what the socket refuses -------------------------------------------------------------


async def test_text_from_the_client_gets_an_error_and_the_socket_keeps_streaming(system, wallet):
    comm = await watch()
    await comm.send_to(text_data="hello")
    reply = await comm.receive_json_from(timeout=WAIT)
    assert reply["type"] == "error" and reply["error"]
    await comm.send_to(text_data=json.dumps({"type": "subscribe"}))
    assert (await comm.receive_json_from(timeout=WAIT))["type"] == "error"

    flow = await in_thread(settle_faucet, wallet(), 10 * U)
    rows = await in_thread(settled, pushed_for=flow.id)
    got = await receive(comm, len(rows) + 1)
    assert [e["message"]["id"] for e in got[:-1]] == [r.msg_id for r in rows]
    assert got[-1] == {"type": "flow", "flow": flow.id, "status": "completed", "error": None}
    await comm.disconnect()


@pytest.mark.parametrize("path", [
    "/ws/flows/not-a-flow-id/",
    "/ws/flows/" + "A" * 42 + "/",
    "/ws/flows/" + "A" * 42 + "!/",
    "/ws/flows/" + "A" * 44 + "/",
    "/ws/other/",
])
async def test_a_malformed_path_is_refused_at_the_handshake(path):
    comm = WebsocketCommunicator(application, path, headers=ORIGIN)
    connected, _code = await comm.connect()
    assert not connected


async def test_a_foreign_origin_is_refused():
    comm = WebsocketCommunicator(application, "/ws/flows/", headers=[(b"origin", b"http://evil.example")])
    connected, _ = await comm.connect()
    assert not connected
