"""Prints the comparison table from a compare.sh results directory.

Each scenario may have run several times (files NAME.1.json, NAME.2.json, ...);
every figure in the table is the median over the runs, and lost/duplicated
deliveries are summed over them.
"""
import glob
import json
import os
import statistics
import sys

out, synapse_version = sys.argv[1], sys.argv[2]


def load(name):
    """Every successful run of NAME."""
    runs = []
    for path in sorted(glob.glob(os.path.join(out, name + ".*.json"))):
        try:
            with open(path) as f:
                r = json.load(f)
        except (OSError, ValueError):
            continue
        if not r.get("failed"):
            runs.append(r)
    return runs


def one(d, path):
    for k in path.split("."):
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def value(r, path):
    """A figure of one run: a dotted path, or a function of the run."""
    return path(r) if callable(path) else one(r, path)


def unanswered(r):
    """Newcomers who timed out or failed other than by a refusal."""
    n = r.get("newcomers", {})
    return n.get("timed_out", 0) + sum(n.get("failed", {}).values())


def chat_errors(r):
    """Failed requests of the people chatting (sends and syncs)."""
    return sum(r.get("send_errors", {}).values()) + sum(r.get("sync_errors", {}).values())


def median(runs, path):
    values = [v for v in (value(r, path) for r in runs) if isinstance(v, (int, float))]
    if not values:
        return None
    m = statistics.median(values)
    return int(m) if all(isinstance(v, int) for v in values) and m == int(m) else float(m)


def total(runs, path):
    values = [one(r, path) for r in runs]
    return sum(v for v in values if isinstance(v, int)) if values else None


ROWS = [
    ("versions", "GET /versions req/s", "requests_per_sec", True),
    ("register", "signups/s", "signups_per_sec", True),
    ("register", "signup latency p99 (ms)", "latency.p99_ms", False),
    ("messages", "messages/s (full speed)", "sends_per_sec", True),
    ("messages", "delivery p50 (ms)", "delivery_latency.p50_ms", False),
    ("messages", "delivery p99 (ms)", "delivery_latency.p99_ms", False),
    ("messages", "lost / duplicated", None, None),
    ("todevice", "to-device messages/s", "sends_per_sec", True),
    ("todevice", "delivery p50 (ms)", "delivery_latency.p50_ms", False),
    ("todevice", "delivery p99 (ms)", "delivery_latency.p99_ms", False),
    ("todevice", "lost / duplicated", None, None),
    ("bigroom", "members joined", "joined", True),
    ("bigroom", "joins/s", "joins_per_sec", True),
    ("bigroom", "delivery p99 to all (ms)", "delivery_latency.p99_ms", False),
    ("bigroom", "lost / duplicated", None, None),
    ("idle", "long-polls held", "held", True),
    ("idle", "server RSS while held (MiB)", "server_rss_held_mib", False),
    ("idle", "server RSS / held client (KiB)", "rss_held_per_client_kib", False),
    ("idle", "delivery p99 to all (ms)", "delivery_latency.p99_ms", False),
    ("idle", "lost / duplicated", None, None),
    ("surge", "sign-ups/s alone (capacity)", "capacity_signups_per_sec", True),
    ("surge", "sign-ups/s admitted in a 10x flood", "flood_admitted_per_sec", True),
    ("surge", "admitted / capacity (%)", lambda r: 100 * r.get("admitted_share_of_capacity", 0), True),
    ("surge", "newcomers refused (M_LIMIT_EXCEEDED)", "newcomers.refused", None),
    ("surge", "refusal answered in, p99 (ms)", "newcomers.refusal_latency.p99_ms", False),
    ("surge", "newcomers timed out or failed", unanswered, False),
    ("surge", "chat delivery p99 before (ms)", "delivery_latency.before.p99_ms", False),
    ("surge", "chat delivery p99 during flood (ms)", "delivery_latency.flood.p99_ms", False),
    ("surge", "chat delivery p99 5 s after (ms)", "delivery_latency.after_settled.p99_ms", False),
    ("surge", "server RSS before flood (MiB)", "server_rss_before_mib", False),
    ("surge", "server RSS at flood end (MiB)", "server_rss_flood_end_mib", False),
    ("surge", "server RSS at the end (MiB)", "server_rss_end_mib", False),
    ("surge", "chat send/sync errors", chat_errors, False),
    ("surge", "lost / duplicated", None, None),
    ("roomlist", "rooms of the user", "rooms", None),
    ("roomlist", "first page of a new connection p50 (ms)", "first_page.p50_ms", False),
    ("roomlist", "first page p99 (ms)", "first_page.p99_ms", False),
    ("roomlist", "next page p99 (ms)", "next_page.p99_ms", False),
    ("roomlist", "wrong answers", "wrong_answers", None),
    ("roomlist", "errors", "errors", None),
]


def fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.1f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def runs_label(runs):
    return f" ({len(runs)} runs)" if len(runs) > 1 else ""


print(f"| scenario | figure | Synapse {synapse_version} | Kabar | Kabar/Synapse |")
print("| --- | --- | --- | --- | --- |")
for scenario, label, path, higher_better in ROWS:
    s, k = load("synapse-" + scenario), load("kabar-" + scenario)
    if not s and not k:
        continue
    if path is None:
        sv = "{} / {}".format(total(s, "deliveries.lost"), total(s, "deliveries.duplicated")) if s else "-"
        kv = "{} / {}".format(total(k, "deliveries.lost"), total(k, "deliveries.duplicated")) if k else "-"
        print(f"| {scenario} | {label} | {sv} | {kv} | |")
        continue
    sv, kv = median(s, path), median(k, path)
    comparable = higher_better is not None and isinstance(sv, (int, float)) and isinstance(kv, (int, float)) and sv
    ratio = (f"{kv / sv:,.1f}x" if kv / sv >= 1 else f"{kv / sv:.3f}x") if comparable else "-"
    print(f"| {scenario}{runs_label(k)} | {label} | {fmt(sv)} | {fmt(kv)} | {ratio} |")

half = load("kabar-messages-half")
if half:
    print()
    print(
        "Kabar `messages` at half its maximum rate{} ({:.1f} msgs/s): delivery p50 {:.1f} ms, p99 {:.1f} ms, lost {}, duplicated {}.".format(
            runs_label(half) and " (medians of {} runs)".format(len(half)),
            median(half, "sends_per_sec") or 0,
            median(half, "delivery_latency.p50_ms") or 0,
            median(half, "delivery_latency.p99_ms") or 0,
            total(half, "deliveries.lost"),
            total(half, "deliveries.duplicated"),
        )
    )

busy = load("kabar-surge-busy")
if busy:
    print()
    print(
        "Kabar `surge` under a busier chat{} ({:.0f} msgs/s): capacity {:.1f} sign-ups/s, admitted {:.1f}/s in the flood ({:.0%}), "
        "refusals answered p99 {:.1f} ms, {} timed out or failed; chat delivery p99 before {:.1f} ms, during {:.1f} ms, 5 s after {:.1f} ms; "
        "send/sync errors {}, lost {}, duplicated {}.".format(
            runs_label(busy) and " (medians of {} runs)".format(len(busy)),
            (median(busy, "users") or 0) * (median(busy, "rate_per_sender") or 0),
            median(busy, "capacity_signups_per_sec") or 0,
            median(busy, "flood_admitted_per_sec") or 0,
            median(busy, "admitted_share_of_capacity") or 0,
            median(busy, "newcomers.refusal_latency.p99_ms") or 0,
            sum(unanswered(r) for r in busy),
            median(busy, "delivery_latency.before.p99_ms") or 0,
            median(busy, "delivery_latency.flood.p99_ms") or 0,
            median(busy, "delivery_latency.after_settled.p99_ms") or 0,
            sum(chat_errors(r) for r in busy),
            total(busy, "deliveries.lost"),
            total(busy, "deliveries.duplicated"),
        )
    )
