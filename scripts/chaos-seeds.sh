#!/usr/bin/env bash
# Replays the chaos seeds CI keeps (chaos/seeds: one `SEED DURATION` per line), each to a valid
# end, on the binaries in target/debug (`just chaos-seeds` builds them first; `just test` runs
# this beside the tests, on the build it just made). The binaries are copied first and run
# from the copy: a cargo call meanwhile links target/debug's files anew, and a replica or agent
# restarted by a fault must never find its binary missing for that instant.
set -euo pipefail
cd "$(dirname "$0")/.."
bins=target/chaos-bin
rm -rf "$bins"
mkdir -p "$bins"
for bin in outpost outpost-agent outpost-chaos; do
    [ -x "target/debug/$bin" ] || { echo "target/debug/$bin is missing: cargo build --bins" >&2; exit 1; }
    cp "target/debug/$bin" "$bins/"
done
grep -v '^#' chaos/seeds | while read -r seed duration; do
    [ -n "$seed" ] || continue
    echo "== chaos seed $seed for $duration"
    "$bins/outpost-chaos" --seed "$seed" --duration "$duration" --bin-dir "$bins" > "target/chaos-seed-$seed.log" 2>&1 \
        || { tail -60 "target/chaos-seed-$seed.log"; exit 1; }
    grep -E '^(faults injected|  \[|verdict)' "target/chaos-seed-$seed.log"
done
