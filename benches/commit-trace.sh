#!/bin/bash
# Where a durable 4k write's time goes, from kernel tracepoints (perf, system-wide): one
# mirrorblkd (0 replicas, every write durable), filled once like fio-compare's volumes, under
# fio's nbd engine at 4k randwrite QD1 or QD32, traced for TRACE seconds in the middle of the
# run. It prints, per journal group commit (one io_uring WRITEV of the core thread): the
# submission's issue to the device, the device's write, the wait for the block layer to issue
# the cache flush an O_DSYNC write needs on a disk without FUA, the flush on the device, the
# wait from the flush's end to the completion being posted to the core thread, and from there
# to the core thread's next return from epoll_wait (where tokio-uring first sees it). At QD1 it
# also prints one request's cycle: fio's send to the daemon's wake-up, the daemon's work before
# the commit's submission, the device, the device's end to the daemon's wake-up, the daemon's
# work up to the reply, and the reply to fio's next request.
# TARGET=raw-dsync traces fio alone instead (io_uring, O_DIRECT|O_DSYNC on a written file, the
# disk's limit in fio-compare): each 4k write is then a "commit", for the same breakdown.
# The tracepoints cost a few microseconds each: read the figures as shares, not as the
# untraced latency (fio's own figures, printed first, are for the whole run, traced second
# included).
# Usage: DIR=/var/tmp/commit-trace [MIRRORBLKD=target/release/mirrorblkd] [QD=32] [TRACE=1]
#        [RUNTIME=6] [TARGET=mirrorblk|raw-dsync] benches/commit-trace.sh
# Bounded: fio has a runtime, perf records for TRACE seconds, every wait has a timeout, and
# the daemon (started here, ended by its PID) and its files are removed at the end.
set -eu
DIR=${DIR:?set DIR}
MIRRORBLKD=${MIRRORBLKD:-$(dirname "$0")/../target/release/mirrorblkd}
QD=${QD:-32}
TRACE=${TRACE:-1}
RUNTIME=${RUNTIME:-6}
TARGET=${TARGET:-mirrorblk}
[ "$TRACE" -lt "$RUNTIME" ] || { echo "TRACE ($TRACE s) must be shorter than RUNTIME ($RUNTIME s)" >&2; exit 2; }
command -v perf > /dev/null || apt-get install -y -q linux-perf > /dev/null
command -v fio > /dev/null || apt-get install -y -q fio > /dev/null
mkdir -p "$DIR"
vol="$DIR/vol"
rm -rf "$vol"
mkdir -p "$vol"
pid=
cleanup() {
    [ -n "$pid" ] && kill -9 "$pid" 2> /dev/null || true
    rm -rf "$vol"
}
trap cleanup EXIT
case $TARGET in
mirrorblk)
    "$MIRRORBLKD" --export vol0 --data "$vol/data.img" --journal "$vol/journal" --size 1G \
        --listen 127.0.0.1:0 --admin-socket "$vol/admin" > "$vol/log" 2>&1 &
    pid=$!
    port=
    for _ in $(seq 100); do
        port=$(sed -n 's/.*serving NBD on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$vol/log" | head -1)
        [ -n "$port" ] && break
        sleep 0.1
    done
    [ -n "$port" ] || { echo "mirrorblkd did not start:" >&2; cat "$vol/log" >&2; exit 1; }
    # Filled once, as fio-compare does, so no write lands in a hole of the data file.
    target=(--ioengine=nbd --uri="nbd://127.0.0.1:$port/vol0")
    timeout 120 fio --name=fill "${target[@]}" --rw=write --bs=1M --iodepth=8 --size=1g > /dev/null
    submitter=core opcode=WRITEV
    ;;
raw-dsync)
    dd if=/dev/zero of="$vol/raw.img" bs=1M count=1024 oflag=direct status=none
    target=(--ioengine=io_uring --direct=1 --sync=dsync --filename="$vol/raw.img")
    submitter=fio opcode=WRITE
    ;;
*)
    echo "TARGET must be mirrorblk or raw-dsync, not $TARGET" >&2
    exit 2
    ;;
esac
timeout $((RUNTIME + 30)) fio --name=w "${target[@]}" --rw=randwrite --bs=4k \
    --iodepth="$QD" --size=1g --time_based --runtime="$RUNTIME" --lat_percentiles=1 \
    --output-format=json > "$vol/fio.json" 2> /dev/null &
fio_pid=$!
sleep $(((RUNTIME - TRACE) / 2))
events=io_uring:io_uring_submit_req,io_uring:io_uring_complete
events=$events,syscalls:sys_exit_epoll_wait,syscalls:sys_enter_sendmsg,syscalls:sys_enter_sendto
events=$events,block:block_rq_issue,block:block_rq_complete
timeout $((TRACE + 30)) perf record -q -o "$vol/perf.data" -e "$events" -a -- sleep "$TRACE" 2> /dev/null
wait "$fio_pid"
perf script -i "$vol/perf.data" -F comm,tid,time,event,trace 2> /dev/null > "$vol/trace.txt"
python3 - "$vol/fio.json" "$vol/trace.txt" "$QD" "$TRACE" "$submitter" "$opcode" <<'EOF'
import bisect, json, re, statistics, sys

fio_path, trace_path, qd, trace_s = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
submitter, opcode = sys.argv[5], sys.argv[6]
text = open(fio_path).read()
w = json.loads(text[text.index("{"):])["jobs"][0]["write"]
print(f"fio 4k randwrite QD{qd}: {w['iops']:.0f} IOPS, p50 {w['lat_ns']['percentile']['50.000000'] / 1000:.0f} us")

LINE = re.compile(r"\s*(\S+)\s+\d+\s+([\d.]+):\s+(\S+):\s*(.*)")
events = []
for line in open(trace_path):
    m = LINE.match(line)
    if m:
        events.append((float(m.group(2)) * 1e6, m.group(1), m.group(3), m.group(4)))

def show(name, xs):
    if not xs:
        print(f"  {name:34} (none seen)")
        return
    xs = sorted(xs)
    print(f"  {name:34} p50 {statistics.median(xs):6.0f}  mean {statistics.mean(xs):6.0f}"
          f"  p90 {xs[int(len(xs) * 0.9)]:6.0f} us  (n={len(xs)})")

# Group commits: a WRITEV the core thread submits (for raw-dsync: a WRITE fio submits), the device write issued inline in that
# submission, its end, the flush issued next (by a kworker), that flush's end, the CQE.
commits, by_req, by_sector, current = [], {}, {}, None
flush_issued, flush_done, epoll_core = [], [], []
for t, comm, ev, tr in events:
    if ev == "io_uring:io_uring_submit_req":
        req = re.search(r"req (\S+),", tr).group(1)
        current = {"sub": t} if f"opcode {opcode}," in tr and comm.startswith(submitter) else None
        if current:
            by_req[req] = current
    elif ev == "block:block_rq_issue":
        m = re.search(r" (\w+) (\d+) \(\) (\d+) \+ (\d+)", tr)
        if " FF " in tr:
            flush_issued.append(t)
        elif m and current is not None and comm.startswith(submitter):
            current["issue"] = t
            by_sector[m.group(3)] = current
            current = None
    elif ev == "block:block_rq_complete":
        m = re.search(r" (\w+) \(\) (\d+) \+ (\d+)", tr)
        if " FF " in tr:
            flush_done.append(t)
        elif m and m.group(2) in by_sector:
            by_sector.pop(m.group(2))["written"] = t
    elif ev == "io_uring:io_uring_complete":
        req = re.search(r"req (\S+),", tr).group(1)
        if req in by_req:
            c = by_req.pop(req)
            c["cqe"] = t
            commits.append(c)
    elif ev == "syscalls:sys_exit_epoll_wait" and comm.startswith(submitter):
        epoll_core.append(t)

parts = {k: [] for k in ["submission to device", "device write", "written to flush issued",
                         "flush on the device", "flush end to CQE posted",
                         "CQE to the core's next epoll return", "commit: submission to CQE"]}
for c in commits:
    if "written" not in c:
        continue
    i = bisect.bisect_left(flush_issued, c["written"])
    j = bisect.bisect_left(flush_done, flush_issued[i]) if i < len(flush_issued) else len(flush_done)
    if j >= len(flush_done) or flush_done[j] > c["cqe"]:
        continue
    k = bisect.bisect_left(epoll_core, c["cqe"])
    parts["submission to device"].append(c["issue"] - c["sub"])
    parts["device write"].append(c["written"] - c["issue"])
    parts["written to flush issued"].append(flush_issued[i] - c["written"])
    parts["flush on the device"].append(flush_done[j] - flush_issued[i])
    parts["flush end to CQE posted"].append(c["cqe"] - flush_done[j])
    if k < len(epoll_core):
        parts["CQE to the core's next epoll return"].append(epoll_core[k] - c["cqe"])
    parts["commit: submission to CQE"].append(c["cqe"] - c["sub"])
print(f"group commits: {len(commits) / trace_s:.0f}/s, cache flushes: {len(flush_done) / trace_s:.0f}/s")
for name, xs in parts.items():
    show(name, xs)

if qd == 1 and submitter == "core":
    # One request at a time: fio sends its 4 KiB payload, the daemon wakes, submits the
    # commit, the device ends, the daemon wakes, replies, fio sends the next request.
    cycle = {k: [] for k in ["fio's send to the daemon's wake", "wake to commit submitted",
                             "device (write and flush)", "device end to the daemon's wake",
                             "wake to the reply", "reply to fio's next send"]}
    state, mark = 0, {}
    for t, comm, ev, tr in events:
        if comm == "fio" and ev == "syscalls:sys_enter_sendto" and "len: 0x00001000" in tr:
            if state == 5:
                cycle["reply to fio's next send"].append(t - mark["reply"])
            mark, state = {"send": t}, 1
        elif state == 1 and comm.startswith("core") and ev == "syscalls:sys_exit_epoll_wait":
            mark["wake"], state = t, 2
            cycle["fio's send to the daemon's wake"].append(t - mark["send"])
        elif state == 2 and ev == "io_uring:io_uring_submit_req" and "WRITEV" in tr:
            mark["sub"], state = t, 3
            cycle["wake to commit submitted"].append(t - mark["wake"])
        elif state == 3 and ev == "block:block_rq_complete" and " FF " not in tr and "() 0 + 0" in tr:
            mark["dev"], state = t, 4
            cycle["device (write and flush)"].append(t - mark["sub"])
        elif state == 4 and comm.startswith("core") and ev == "syscalls:sys_exit_epoll_wait":
            mark["wake2"], state = t, 45
            cycle["device end to the daemon's wake"].append(t - mark["dev"])
        elif state == 45 and ev == "syscalls:sys_enter_sendmsg":
            mark["reply"], state = t, 5
            cycle["wake to the reply"].append(t - mark["wake2"])
    print("one request at QD1:")
    for name, xs in cycle.items():
        show(name, xs)
EOF
