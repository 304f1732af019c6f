"""Prints the comparison table from a compare.sh results directory."""
import json
import os
import sys

out, synapse_version = sys.argv[1], sys.argv[2]


def load(name):
    try:
        with open(os.path.join(out, name + ".json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def get(d, path):
    for k in path.split("."):
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


ROWS = [
    ("versions", "GET /versions req/s", "requests_per_sec", True),
    ("register", "signups/s", "signups_per_sec", True),
    ("register", "signup latency p99 (ms)", "latency.p99_ms", False),
    ("messages", "messages/s (full speed)", "sends_per_sec", True),
    ("messages", "delivery p50 (ms)", "delivery_latency.p50_ms", False),
    ("messages", "delivery p99 (ms)", "delivery_latency.p99_ms", False),
    ("messages", "lost / duplicated", None, None),
    ("bigroom", "members joined", "joined", True),
    ("bigroom", "joins/s", "joins_per_sec", True),
    ("bigroom", "delivery p99 to all (ms)", "delivery_latency.p99_ms", False),
    ("idle", "long-polls held", "held", True),
    ("idle", "server RSS per held client (KiB)", "rss_per_client_kib", False),
    ("idle", "delivery p99 to all (ms)", "delivery_latency.p99_ms", False),
]


def fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.1f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


print(f"| scenario | figure | Synapse {synapse_version} | Kabar | Kabar/Synapse |")
print("| --- | --- | --- | --- | --- |")
for scenario, label, path, higher_better in ROWS:
    s, k = load("synapse-" + scenario), load("kabar-" + scenario)
    if not s and not k:
        continue
    if path is None:
        sv = "{} / {}".format(get(s, "deliveries.lost"), get(s, "deliveries.duplicated")) if s else "-"
        kv = "{} / {}".format(get(k, "deliveries.lost"), get(k, "deliveries.duplicated")) if k else "-"
        print(f"| {scenario} | {label} | {sv} | {kv} | |")
        continue
    sv, kv = get(s, path), get(k, path)
    ratio = (f"{kv / sv:,.1f}x" if kv / sv >= 1 else f"{kv / sv:.3f}x") if isinstance(sv, (int, float)) and isinstance(kv, (int, float)) and sv else "-"
    print(f"| {scenario} | {label} | {fmt(sv)} | {fmt(kv)} | {ratio} |")

half = load("kabar-messages-half")
if half:
    print()
    print(
        "Kabar `messages` at half its maximum rate ({:.1f} msgs/s): delivery p50 {:.1f} ms, p99 {:.1f} ms, lost {}, duplicated {}.".format(
            half.get("sends_per_sec", 0),
            get(half, "delivery_latency.p50_ms") or 0,
            get(half, "delivery_latency.p99_ms") or 0,
            get(half, "deliveries.lost"),
            get(half, "deliveries.duplicated"),
        )
    )
