#!/usr/bin/env python3
"""Render docs/reliability.md from the figures the test suites wrote.

Reads test-artifacts/reliability/*.json:
  faults.json        tests/faults/test_faults.py (fault injection on the scaled stack)
  hostile.json       the hostile-input matrix ({"bad_inputs": N, ...})
  authz_matrix.json  the authorization matrix ({"cells": [{"result": ...}, ...]})
  load.json          load figures (manage.py bench, or the load test)
and any other *.json there (shown as its top-level figures). Missing files are
reported as "not measured". `make reliability` runs the producers, then this.

    python scripts/reliability_report.py [--artifacts DIR] [--out FILE]
"""

import argparse
import json
import sys
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KNOWN = ("faults.json", "hostile.json", "authz_matrix.json", "load.json")

# What the fault suite found in the code while it was being built (kept here, next to the figures).
FINDINGS = [
    ("Daphne leaked database connections",
     "Under ASGI each request runs its sync code in a thread of its own, so with `DB_CONN_MAX_AGE=60` "
     "every request left a connection open until garbage collection: 20 wallets drove the web process to "
     "93 Postgres connections, Postgres answered \"too many clients\", the API returned 500 and workers "
     "could not reconnect either. Fixed in `tim3web/asgi.py` (web processes default to `DB_CONN_MAX_AGE=0`, "
     "as Django advises under ASGI); afterwards the peak is one connection per concurrent request and no 5xx."),
    ("A transient database error inside a handler became the message's failure",
     "`run_handler` caught every exception as the handler's: a lock or statement timeout, a deadlock or "
     "serialization victim, or a cancelled statement inside a handler was committed as `failed` with "
     "`<Action>-Error` (a user's valid transfer refused), and replay, which meets no such error, disagreed "
     "with the log for ever (`verify` failed). Fixed in `processes/runtime/delivery.py`: `OperationalError` "
     "and `InterfaceError` propagate, the drain rolls back and the task retries. Regression test: "
     "`tests/faults/test_transient_db_errors.py` (a real worker with `lock_timeout=200ms` and a row lock held "
     "on the payer's account)."),
    ("`manage.py mailbox` did not say whose flow a pending operation belongs to",
     "It now prints the flow id (`GET /api/flows/<id>` shows every hop); see docs/operations.md."),
]


def load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def table(rows, header=("", "")) -> list[str]:
    out = [f"| {' | '.join(header)} |", "|" + "---|" * len(header)]
    out += [f"| {' | '.join(str(c) for c in row)} |" for row in rows]
    return out + [""]


def n(value) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def ok(flag) -> str:
    return "yes" if flag else "**no**"


def faults_section(f: dict | None) -> tuple[list[str], list[str]]:
    """(summary rows, section lines)."""
    if f is None:
        return ([("Money lost or duplicated under faults", "not measured (no faults.json)")],
                ["## Fault injection", "", "Not measured: `test-artifacts/reliability/faults.json` is missing.", ""])
    passed, problems = f.get("passed"), f.get("problems", [])
    if "flows" not in f:  # the run stopped before its checks
        return ([("Money lost or duplicated under faults", "**unknown: the run did not finish**")],
                ["## Fault injection", "", "**The run did not finish:**", "", *[f"- {p}" for p in problems], ""])
    flows, faults, http, timeouts = f["flows"], f["faults"], f["http"], f["timeouts"]
    once, seconds, stack = f.get("exactly_once", {}), f.get("seconds", {}), f.get("stack", {})
    verdict = ("none found" if passed else "**problems found** (see below)")
    summary = [
        ("Money lost or duplicated under faults", verdict),
        ("Flows driven through the HTTP API", f"{n(flows['total'])} ({n(flows['completed'])} completed, "
                                             f"{n(flows['refunded'])} refunded, {n(flows['failed'])} failed, "
                                             f"{n(flows['pending'])} left pending)"),
        ("Hops (messages applied by the processes)", n(f["hops"])),
        ("Faults injected", f"{n(faults['workers_killed'])} worker SIGKILLs, {n(faults['redis_restarts'])} Redis "
                            f"restarts, {n(faults['connections_dropped'])} dropped DB connections, "
                            f"{n(faults.get('statements_canceled', 0))} cancelled statements, "
                            f"{n(faults['duplicate_doorbells'])} duplicate doorbells, "
                            f"{n(timeouts['operations_timed_out'])} operation timeouts"),
    ]
    lines = [
        "## Fault injection", "",
        "`tests/faults/test_faults.py` (marker `scaled`, part of `make test`). Postgres (the pytest-django test "
        f"database), a private `redis-server`, {stack.get('workers', '?')} `celery worker` processes, `celery beat` "
        "(sweeper every 1 s, `CleanupExpired` every 2 s) and Daphne, driven through the HTTP API by "
        f"{stack.get('wallets', '?')} wallets in threads: register, Bearer token, faucet, deposits and redemptions "
        "in both modes (v2 custody and v1 lock), each POST with an `Idempotency-Key` and retried with it on a 5xx "
        "or a lost answer. A few requests are hopeless on purpose (below the minimum, more than the wallet "
        f"holds). `PendingTimeout` = {stack.get('pending_timeout_s', '?')} s. "
        f"Seed {f.get('seed')} (`TIM3_FAULT_SEED={f.get('seed')}` repeats the random choices), run "
        f"{f.get('generated_at', '?')}.", "",
        "### Faults injected", "",
        *table([
            ("worker SIGKILLed (a replacement started at once)", n(faults["workers_killed"])),
            ("every worker stopped (SIGTERM) past PendingTimeout, then restarted",
             n(faults["all_workers_stopped"])),
            ("Redis `SHUTDOWN NOSAVE` (everything queued lost), started again empty",
             f"{n(faults['redis_restarts'])} ({faults['redis_down_seconds']} s down in all)"),
            ("worker DB connection terminated inside a write transaction (`pg_terminate_backend`)",
             n(faults["connections_dropped_mid_write"])),
            ("worker DB connection terminated, in all", n(faults["connections_dropped"])),
            ("worker statement cancelled inside a write transaction (`pg_cancel_backend`)",
             n(faults.get("statements_canceled", 0))),
            ("duplicate doorbells (`drain.delay` for random processes)", n(faults["duplicate_doorbells"])),
            ("  of which delayed with countdowns, enqueued in reverse order", n(faults["reordered_doorbells"])),
            ("operations that passed PendingTimeout (coordinator asked `Message-Status`)",
             n(timeouts["operations_timed_out"])),
        ], ("fault", "count")),
        f"Fault phase {seconds.get('faults', '?')} s; every accepted flow had ended {seconds.get('settle', '?')} s "
        f"later, with no manual step; whole test {seconds.get('total', '?')} s.", "",
        "### Outcome", "",
        *table([(k, n(v)) for k, v in flows.get("by_kind", {}).items()], ("flow (kind/mode status)", "count")),
        "### What was checked afterwards", "",
        *table([(name, ok(held)) for name, held in f.get("checks", {}).items()], ("check", "holds")),
        f"Tokens recorded {n(once.get('tim3_mints', 0))} TIM3 mints, {n(once.get('tim3_burns', 0))} TIM3 burns and "
        f"{n(once.get('usda_mints', 0))} USDA faucet mints, each once, each with its one response; "
        f"{n(once.get('operations', 0))} coordinator operations; "
        f"{n(timeouts.get('cleanup_ticks_after_last_redis_restart', 0))} CleanupExpired ticks after the last Redis "
        f"restart; `verify`: {'; '.join(f.get('verify', []))}.", "",
        "### The HTTP API during the faults", "",
        *table([
            ("requests", n(http["requests"])),
            ("fund-moving requests accepted (202)", n(http["accepted"])),
            ("  accepted on a retry with the same Idempotency-Key", n(http["accepted_after_retry"])),
            ("answered (< 500) while Redis was down", n(http.get("answered_during_redis_outage", "?"))),
            ("  fund-moving requests accepted (202) while Redis was down",
             n(http.get("accepted_during_redis_outage", "?"))),
            ("5xx", n(http["5xx"])),
            ("  of which during a Redis outage", n(http["5xx_during_redis_outage"])),
            ("no answer (connection refused, reset, timeout)", n(http["no_answer"])),
            ("5xx that had moved funds", n(http["5xx_that_moved_funds"])),
            ("requests given up after retries", n(http["given_up"])),
            ("latency ms (p50 / p99 / max), all requests", "{p50} / {p99} / {max}".format(
                **{"p50": "?", "p99": "?", "max": "?", **http.get("latency_ms", {})})),
            ("latency ms (p50 / p99 / max), while Redis was down", "{p50} / {p99} / {max}".format(
                **{"p50": "?", "p99": "?", "max": "?", **http.get("latency_ms_during_redis_outage", {})})),
        ], ("", "")),
        "Peak Postgres connections during the faults: " + ", ".join(
            f"{n(v)} {k if k != 'server' else 'on the whole server (other test runs included)'}"
            for k, v in f.get("peak_database_connections", {}).items()) + ".", "",
        "### Timeouts", "",
        *table([
            ("CleanupExpired ticks applied", n(timeouts["cleanup_ticks"])),
            ("operations past PendingTimeout", n(timeouts["operations_timed_out"])),
            ("  the awaited request had been handled: kept waiting for its delayed reply",
             n(timeouts["timed_out_still_handled"])),
            ("  compensated (request never handled)", n(timeouts["compensated_after_timeout"])),
            ("late replies to settled operations, ignored", n(timeouts["late_replies_ignored"])),
        ], ("", "")),
        "A process applies one sender's messages in order, so the `Message-Status` answer comes after the "
        "request it asks about: a handled request keeps its operation waiting and nothing is compensated twice.",
        "",
    ]
    if f.get("timeline"):
        lines += ["### Timeline", "", *[f"- {t} s: {what}" for t, what in f["timeline"]], ""]
    if problems:
        lines += ["### Problems found", "", *[f"- {p}" for p in problems], ""]
    return summary, lines


def hostile_section(h: dict | None) -> tuple[list, list[str]]:
    if h is None:
        return [("Bad inputs tried", "not measured (no hostile.json)")], []
    rows = [(k, n(v)) for k, v in h.items() if not isinstance(v, (dict, list))]
    for key, value in h.items():
        if isinstance(value, dict):
            rows += [(f"{key}: {k}", n(v)) for k, v in value.items()]
    summary = [("Bad inputs tried", f"{n(h.get('bad_inputs', '?'))}" +
                (f" ({n(h['accepted_safely'])} accepted safely)" if "accepted_safely" in h else ""))]
    return summary, ["## Hostile inputs", "", "From `hostile.json` (the hostile-input matrix).", "",
                     *table(rows, ("figure", "value"))]


def authz_section(a: dict | None) -> tuple[list, list[str]]:
    if a is None:
        return [], []
    cells = a.get("cells", [])
    by = Counter((c.get("table", "?"), c.get("result", "?")) for c in cells)
    rows = [(f"{t}: {r}", n(count)) for (t, r), count in sorted(by.items())]
    return ([("Authorization cells checked", n(len(cells)))],
            ["## Authorization matrix", "", "From `authz_matrix.json`: every role against every guarded "
             "handler and page.", "", *table(rows, ("cells", "count"))])


def load_section(d: dict | None) -> tuple[list, list[str]]:
    if d is None:
        return ([("Load", "not measured yet (no load.json)")],
                ["## Load", "", "Not measured yet: `test-artifacts/reliability/load.json` is missing.", ""])
    scalars = [(k, n(v)) for k, v in d.items() if not isinstance(v, (dict, list))]
    nested = [(f"{k}: {kk}", n(vv)) for k, v in d.items() if isinstance(v, dict) for kk, vv in v.items()]
    rate = [f"{d[k]} {k.replace('_per_s', '/s')}" for k in ("flows_per_s", "hops_per_s") if k in d]
    return ([("Load", ", ".join(rate) or "see below")],
            ["## Load", "", "From `load.json`.", "", *table(scalars + nested, ("figure", "value"))])


def other_sections(artifacts: Path) -> list[str]:
    lines = []
    for path in sorted(artifacts.glob("*.json")):
        if path.name in KNOWN:
            continue
        data = load(path)
        if isinstance(data, dict):
            rows = [(k, n(v)) for k, v in data.items() if not isinstance(v, (dict, list))]
            lines += [f"## {path.stem}", "", f"From `{path.name}`.", "", *table(rows, ("figure", "value"))]
    return lines


def render(artifacts: Path) -> str:
    f_sum, f_lines = faults_section(load(artifacts / "faults.json"))
    h_sum, h_lines = hostile_section(load(artifacts / "hostile.json"))
    a_sum, a_lines = authz_section(load(artifacts / "authz_matrix.json"))
    l_sum, l_lines = load_section(load(artifacts / "load.json"))
    sources = ", ".join(f"`{p.name}`" for p in sorted(artifacts.glob("*.json"))) or "none"
    lines = [
        "# Reliability: can this lose or duplicate my money?", "",
        f"_Generated by `make reliability` (`scripts/reliability_report.py`) on "
        f"{datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} from `test-artifacts/reliability/` ({sources}). "
        "Do not edit: run `make reliability` again._", "",
        "## Summary", "",
        *table(f_sum + h_sum + a_sum + l_sum, ("question", "answer")),
        *f_lines, *h_lines, *a_lines, *l_lines, *other_sections(artifacts),
        "## What the fault suite found (and what was fixed)", "",
        *[f"{i}. **{title}.** {text}" for i, (title, text) in enumerate(FINDINGS, 1)], "",
        "The recovery steps (find stuck or dead messages, re-drive, pause and resume, prove reserves, roll back "
        "a coordinator) are in [operations.md](operations.md); `tests/faults/test_runbook.py` runs each of them.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, default=ROOT / "test-artifacts" / "reliability")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "reliability.md")
    args = parser.parse_args(argv)
    text = render(args.artifacts)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    faults = load(args.artifacts / "faults.json")
    return 0 if faults is None or faults.get("passed") else 1


if __name__ == "__main__":
    sys.exit(main())
