#!/usr/bin/env bash
# End-to-end throughput and memory of mde-forwarder against the built-in API
# emulator, with a syslog CEF TCP sink and a file JSON sink, all on 127.0.0.1.
#
# Usage: scripts/bench-e2e.sh
# Environment:
#   BENCH_COUNTS  detection counts to run (default "10000 100000 500000"; set
#                 it empty to run only the idle test)
#   BENCH_LIMITS  [poll] limit values, 0 for one response (default "0 10000")
#   IDLE_COUNT    detections served before the idle measurement (default 10000)
#   IDLE_SECS     length of the idle measurement in seconds (default 60; 0 skips it)
#   PERF_DATA     when set, each run is recorded with `perf record` into
#                 PERF_DATA-N-LIMIT.data (its figures then include perf's cost)
#   PERF_ARGS     options for `perf record` (default "-F 999"), for example
#                 "-F 499 --call-graph dwarf,16384" for call graphs
#   BENCH_WRAPPER a command that runs the forwarder instead of perf, for
#                 example "valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p"
#                 for instruction counts that do not vary with the machine's load
#   BENCH_LOG_LEVEL  the forwarder's log_level (default warn)
#   KEEP_LOG      when set, each run's forwarder log is kept as KEEP_LOG-N-LIMIT.log
#   SKIP_BUILD=1  use the existing target/release/mde-forwarder
#
# Needs python3 and GNU time (/usr/bin/time). Prints one table row per run
# (with the emulator's CPU time during the run, which shares the cores) and
# the idle figures. Every process it starts is stopped on exit.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
BIN="$ROOT/target/release/mde-forwarder"
# Unset means the defaults; set and empty runs none (for the idle test alone).
COUNTS=${BENCH_COUNTS-"10000 100000 500000"}
LIMITS=${BENCH_LIMITS-"0 10000"}
IDLE_COUNT=${IDLE_COUNT:-10000}
IDLE_SECS=${IDLE_SECS:-60}
# Upper bound in seconds on waiting for the emulator to generate its
# detections, and on one forwarder run.
WAIT_SECS=900

WORK=$(mktemp -d "${TMPDIR:-/tmp}/mde-bench.XXXXXX")
PIDS=()

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

die() {
    echo "bench-e2e: $*" >&2
    exit 1
}

[[ -x /usr/bin/time ]] || die "/usr/bin/time (GNU time) is missing; install the 'time' package"
command -v python3 >/dev/null || die "python3 is missing"

if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    cargo build --release --locked
fi
[[ -x "$BIN" ]] || die "$BIN not found; build it with cargo build --release --locked"

# A TCP receiver that counts line feeds over all connections and writes the
# running total to a file (at most every 0.2 s and when a connection closes).
cat > "$WORK/receiver.py" <<'PY'
import os, selectors, socket, sys, time

count_path, port_path, max_secs = sys.argv[1], sys.argv[2], float(sys.argv[3])
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", 0))
listener.listen(16)
listener.setblocking(False)

def write_atomically(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)

selector = selectors.DefaultSelector()
selector.register(listener, selectors.EVENT_READ)
write_atomically(count_path, "0")
write_atomically(port_path, str(listener.getsockname()[1]))
lines = written = 0
last_write = time.monotonic()
deadline = time.monotonic() + max_secs
while time.monotonic() < deadline:
    for key, _ in selector.select(timeout=0.2):
        if key.fileobj is listener:
            connection, _ = listener.accept()
            connection.setblocking(False)
            selector.register(connection, selectors.EVENT_READ)
            continue
        try:
            data = key.fileobj.recv(1 << 20)
        except BlockingIOError:
            continue
        except ConnectionError:
            data = b""
        if data:
            lines += data.count(b"\n")
        else:
            selector.unregister(key.fileobj)
            key.fileobj.close()
            last_write = 0
    now = time.monotonic()
    if lines != written and now - last_write >= 0.2:
        write_atomically(count_path, str(lines))
        written, last_write = lines, now
PY

# Starts the receiver; sets RECEIVER_PID, RECEIVER_PORT and RECEIVER_COUNT.
start_receiver() {
    local dir=$1
    rm -f "$dir/receiver.port"
    python3 "$WORK/receiver.py" "$dir/receiver.count" "$dir/receiver.port" 7200 &
    RECEIVER_PID=$!
    PIDS+=("$RECEIVER_PID")
    local i
    for ((i = 0; i < 100; i++)); do
        [[ -s "$dir/receiver.port" ]] && break
        sleep 0.1
    done
    [[ -s "$dir/receiver.port" ]] || die "the line receiver did not report its port within 10 s"
    RECEIVER_PORT=$(cat "$dir/receiver.port")
    RECEIVER_COUNT="$dir/receiver.count"
}

# Starts the emulator with COUNT generated detections on a free port; sets
# EMULATOR_PID and EMULATOR_URL.
start_emulator() {
    local dir=$1 count=$2
    "$BIN" emulate --listen 127.0.0.1:0 --generate "$count" --detection-bytes 2048 \
        >"$dir/emulator.out" 2>"$dir/emulator.err" &
    EMULATOR_PID=$!
    PIDS+=("$EMULATOR_PID")
    local i
    for ((i = 0; i < WAIT_SECS * 10; i++)); do
        grep -qs "emulator listening on" "$dir/emulator.err" && break
        kill -0 "$EMULATOR_PID" 2>/dev/null || die "the emulator exited: $(cat "$dir/emulator.err")"
        sleep 0.1
    done
    EMULATOR_URL=$(grep -o "emulator listening on http://127\.0\.0\.1:[0-9]*" "$dir/emulator.err" | head -n 1 | sed 's/.* on //')
    [[ -n "$EMULATOR_URL" ]] || die "the emulator did not start within ${WAIT_SECS} s"
}

# Writes the forwarder config for a run into $dir/config.toml.
write_config() {
    local dir=$1 limit=$2 interval=$3
    cat > "$dir/config.toml" <<TOML
[state]
dir = "$dir/state"

[poll]
interval_secs = $interval
limit = $limit

[service]
log_level = "${BENCH_LOG_LEVEL:-warn}"

[[tenant]]
name = "bench"
tenant_id = "00000000-0000-0000-0000-000000000000"
client_id = "mde-forwarder-demo"
client_secret_env = "MDE_BENCH_CLIENT_SECRET"
api_url = "$EMULATOR_URL"
login_url = "$EMULATOR_URL"

[[sink]]
name = "siem"
type = "syslog"
address = "127.0.0.1:$RECEIVER_PORT"
protocol = "tcp"
format = "cef"

[[sink]]
name = "archive"
type = "file"
path = "$dir/detections.jsonl"
format = "json"
TOML
}
export MDE_BENCH_CLIENT_SECRET=demo-secret

# Waits until the receiver has counted at least COUNT lines.
wait_for_receiver() {
    local count=$1 i
    for ((i = 0; i < 100; i++)); do
        (($(cat "$RECEIVER_COUNT") >= count)) && return 0
        sleep 0.1
    done
    return 1
}

# Stops one process this script started.
stop_process() {
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

# Prints the user plus system CPU time of a process, in clock ticks (fields
# 14 and 15 of /proc/PID/stat).
process_ticks() {
    cut -d ' ' -f 14,15 "/proc/$1/stat" | awk '{ print $1 + $2 }'
}

# Extracts one value of `/usr/bin/time -v` output.
time_field() {
    grep -F "$1" "$2" | head -n 1 | sed 's/.*: //'
}

printf '%-8s %-6s %9s %12s %14s %13s %15s\n' detections limit "wall s" "detections/s" "CPU s/100k" "peak RSS MB" "emulator CPU s"

run_once() {
    local count=$1 limit=$2
    local dir="$WORK/run-$count-$limit"
    mkdir -p "$dir"
    start_receiver "$dir"
    start_emulator "$dir" "$count"
    write_config "$dir" "$limit" 60

    local profiler=()
    if [[ -n "${PERF_DATA:-}" ]]; then
        profiler=(perf record --quiet ${PERF_ARGS:--F 999} -o "$PERF_DATA-$count-$limit.data" --)
    elif [[ -n "${BENCH_WRAPPER:-}" ]]; then
        read -r -a profiler <<<"$BENCH_WRAPPER"
    fi
    local started ended status=0 emulator_before emulator_after
    emulator_before=$(process_ticks "$EMULATOR_PID")
    started=$(date +%s%N)
    timeout "$WAIT_SECS" /usr/bin/time -v -o "$dir/time.txt" "${profiler[@]}" "$BIN" run --once -c "$dir/config.toml" \
        2>"$dir/forwarder.err" || status=$?
    ended=$(date +%s%N)
    emulator_after=$(process_ticks "$EMULATOR_PID")
    [[ $status == 0 ]] || die "run --once failed with status $status (N=$count, limit=$limit): $(tail -n 5 "$dir/forwarder.err")"

    wait_for_receiver "$count" || true
    local received file_lines
    received=$(cat "$RECEIVER_COUNT")
    file_lines=$(wc -l < "$dir/detections.jsonl")
    stop_process "$EMULATOR_PID"
    stop_process "$RECEIVER_PID"
    [[ $received == "$count" ]] || die "the syslog receiver got $received lines, expected $count (N=$count, limit=$limit)"
    [[ $file_lines == "$count" ]] || die "the file sink wrote $file_lines lines, expected $count (N=$count, limit=$limit)"

    local user sys rss_kb
    user=$(time_field "User time (seconds)" "$dir/time.txt")
    sys=$(time_field "System time (seconds)" "$dir/time.txt")
    rss_kb=$(time_field "Maximum resident set size (kbytes)" "$dir/time.txt")
    python3 - "$count" "$limit" "$started" "$ended" "$user" "$sys" "$rss_kb" \
        "$((emulator_after - emulator_before))" "$(getconf CLK_TCK)" <<'PY'
import sys
count, limit, started, ended, user, sys_, rss_kb, emulator_ticks, ticks_per_sec = sys.argv[1:]
count = int(count)
wall = (int(ended) - int(started)) / 1e9
cpu = float(user) + float(sys_)
emulator_cpu = int(emulator_ticks) / int(ticks_per_sec)
print(f"{count:<8} {limit:<6} {wall:9.2f} {count / wall:12.0f} {cpu * 100000 / count:14.2f} {int(rss_kb) / 1024:13.1f} {emulator_cpu:15.2f}")
PY
    [[ -n "${KEEP_LOG:-}" ]] && cp "$dir/forwarder.err" "$KEEP_LOG-$count-$limit.log"
    rm -rf "$dir"
}

for count in $COUNTS; do
    for limit in $LIMITS; do
        run_once "$count" "$limit"
    done
done

# Prints one line per thread of PID: tid, context switches (voluntary and
# involuntary), CPU time in ns from /proc/.../schedstat, and thread name.
thread_wakeups() {
    local task switches runtime
    for task in /proc/"$1"/task/*; do
        switches=$(awk '/ctxt_switches/ { total += $2 } END { print total }' "$task/status" 2>/dev/null) || continue
        runtime=$(cut -d ' ' -f 1 "$task/schedstat" 2>/dev/null) || continue
        echo "${task##*/} $switches $runtime $(cat "$task/comm" 2>/dev/null)"
    done
}

# Idle: the daemon polls every 60 s. After the first poll has delivered
# IDLE_COUNT detections, sample its CPU time and VmRSS once a second.
idle() {
    local dir="$WORK/idle"
    mkdir -p "$dir"
    start_receiver "$dir"
    start_emulator "$dir" "$IDLE_COUNT"
    write_config "$dir" 0 60
    "$BIN" run -c "$dir/config.toml" 2>"$dir/forwarder.err" &
    local daemon=$!
    PIDS+=("$daemon")

    local i delivered=0
    for ((i = 0; i < WAIT_SECS * 10; i++)); do
        kill -0 "$daemon" 2>/dev/null || die "the daemon exited: $(tail -n 5 "$dir/forwarder.err")"
        if (($(cat "$RECEIVER_COUNT") >= IDLE_COUNT)) && [[ -f "$dir/detections.jsonl" ]] &&
            (($(wc -l < "$dir/detections.jsonl") >= IDLE_COUNT)); then
            delivered=1
            break
        fi
        sleep 0.1
    done
    ((delivered)) || die "the daemon did not deliver $IDLE_COUNT detections within ${WAIT_SECS} s"

    # Fields 14 and 15 of /proc/PID/stat are utime and stime in clock ticks.
    local ticks_per_sec samples="$dir/idle-samples.txt"
    ticks_per_sec=$(getconf CLK_TCK)
    : > "$samples"
    thread_wakeups "$daemon" > "$dir/wakeups-before.txt"
    for ((i = 0; i <= IDLE_SECS; i++)); do
        local stat rss
        stat=$(cut -d ' ' -f 14,15 "/proc/$daemon/stat")
        rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$daemon/status")
        echo "$i ${stat% *} ${stat#* } $rss" >> "$samples"
        ((i < IDLE_SECS)) && sleep 1
    done
    thread_wakeups "$daemon" > "$dir/wakeups-after.txt"
    stop_process "$daemon"
    stop_process "$EMULATOR_PID"
    stop_process "$RECEIVER_PID"

    python3 - "$samples" "$ticks_per_sec" "$IDLE_COUNT" "$dir/wakeups-before.txt" "$dir/wakeups-after.txt" <<'PY'
import sys
path, ticks_per_sec, count, before_path, after_path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:]
rows = [list(map(int, line.split())) for line in open(path)]
cpu = [utime + stime for _, utime, stime, _ in rows]
rss = [kb for *_, kb in rows]
busy = [(rows[i][0], cpu[i] - cpu[i - 1]) for i in range(1, len(rows)) if cpu[i] > cpu[i - 1]]
seconds = rows[-1][0] - rows[0][0]
print(f"idle: {seconds} s after the first poll of {count} detections (interval 60 s)")
print(f"idle: CPU used {(cpu[-1] - cpu[0]) / ticks_per_sec:.2f} s (user+sys)")
print(f"idle: VmRSS at start {rss[0] / 1024:.1f} MB, at end {rss[-1] / 1024:.1f} MB, max {max(rss) / 1024:.1f} MB")
busy_text = ", ".join(f"second {s}: {t / ticks_per_sec:.2f} s" for s, t in busy) or "none"
print(f"idle: seconds with CPU use: {busy_text}")

def read_threads(path):
    threads = {}
    for line in open(path):
        tid, switches, runtime_ns, name = line.rstrip("\n").split(" ", 3)
        threads[tid] = (int(switches), int(runtime_ns), name)
    return threads
before, after = read_threads(before_path), read_threads(after_path)
woken = []
for tid, (switches, runtime_ns, name) in sorted(after.items()):
    old_switches, old_runtime_ns, _ = before.get(tid, (0, 0, name))
    if switches > old_switches:
        woken.append(f"{name} ({tid}): {switches - old_switches} wakeups, {(runtime_ns - old_runtime_ns) / 1e6:.1f} ms")
print("idle: threads that ran: " + ("; ".join(woken) or "none"))
PY
}
if ((IDLE_SECS > 0)); then
    idle
fi
