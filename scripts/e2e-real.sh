#!/usr/bin/env bash
# End-to-end run on one machine, the way a team would run grid-flows:
#   PostgreSQL -> `prefect server start` on it -> a 3-node Ray cluster with `ray start`
#   -> `grid blocks apply` -> work pool + `prefect deploy --all` + `prefect worker start`
#   -> the boosted example deployment, the scheduled expire flow, a server restart with a
#   live boost, and a browser check of the Prefect UI (scripts/e2e_check.py).
#
# Everything it starts is stopped by PID on exit (also on failure): the processes it
# started directly, and every process whose environment carries this run's marker
# (ray start and pg_ctl daemonize; their children inherit the marker).
# The last line of output is `PASS` or `FAIL: <step>`.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
BIN="$REPO/.venv/bin"
PY="$BIN/python"
STARTED_AT=$(date +%s)
STEP="setup"
PASSED=0
WORK="$(mktemp -d /tmp/ge2e.XXXX)"       # short: Ray's unix sockets live under it
export GRID_E2E_MARK="run-$$-$RANDOM"    # inherited by every process this run starts
DIRECT_PIDS=()
ARTIFACTS="$REPO/e2e-artifacts"
mkdir -p "$ARTIFACTS"

log() { printf '[e2e %4ss] %s\n' "$(( $(date +%s) - STARTED_AT ))" "$*"; }
step() { STEP="$1"; log "== $1"; }

marked_pids() {
    # PIDs (not ours) whose environment holds this run's marker, or that hold files open
    # under this run's temp dir.
    local p
    for p in /proc/[0-9]*; do
        p="${p#/proc/}"
        [[ "$p" == "$$" || "$p" == "$BASHPID" ]] && continue
        if { tr '\0' '\n' < "/proc/$p/environ"; } 2>/dev/null | grep -qx "GRID_E2E_MARK=$GRID_E2E_MARK"; then
            # Skip our own bash subshells (the command substitution running this loop).
            [[ "$(cat /proc/$p/comm 2>/dev/null)" == "bash" ]] && grep -q "e2e-real.sh" "/proc/$p/cmdline" 2>/dev/null && continue
            echo "$p"
        elif [[ "$(readlink /proc/$p/cwd 2>/dev/null)" == "$REPO" ]] \
                && ls -l "/proc/$p/fd" 2>/dev/null | grep -q -- "-> $WORK/"; then
            # Ray's agents overwrite their environment with their process title; they still
            # hold their log files open under this run's temp dir.
            echo "$p"
        fi
    done
}

stop_everything() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    log "stopping everything this run started"
    local pid pids
    # The worker first, while its server still answers (it lets the flow runs it started
    # finish: up to 60 s); then the server. Then PostgreSQL, then the rest.
    local i waited
    # Drain the worker first: its stop SIGKILLs the flow runs it still runs (left Running), so
    # pause the pool and wait (at most 30 s) until it runs none, then TERM it.
    if [[ -n "${WORKER_PID:-}" ]] && kill -0 "$WORKER_PID" 2>/dev/null; then
        "$BIN/prefect" work-pool pause grid-pool >/dev/null 2>&1
        for waited in $(seq 1 60); do [[ -z "$(pgrep -P "$WORKER_PID")" ]] && break; sleep 0.5; done
        if [[ -n "$(pgrep -P "$WORKER_PID")" ]]; then
            log "worker still runs flow runs 30 s after the pool was paused"
        else
            log "work pool paused; the worker's flow runs finished (within $(( (waited + 1) / 2 )) s)"
        fi
    fi
    for (( i=${#DIRECT_PIDS[@]}; i>=0; i-- )); do
        if (( i == ${#DIRECT_PIDS[@]} )); then pid="${WORKER_PID:-}"; else pid="${DIRECT_PIDS[$i]}"; fi
        [[ -z "$pid" || "$pid" == "${PG_PID:-}" ]] && continue
        kill -0 "$pid" 2>/dev/null || continue
        kill -TERM "$pid" 2>/dev/null
        for waited in $(seq 1 120); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        if kill -0 "$pid" 2>/dev/null; then
            log "pid $pid did not stop within 60 s of TERM"
        elif [[ "$pid" == "${WORKER_PID:-}" ]]; then
            log "worker stopped on TERM (within $(( (waited + 1) / 2 )) s)"
        fi
    done
    if [[ -n "${PGDATA_DIR:-}" && -f "$PGDATA_DIR/postmaster.pid" ]]; then
        runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PGDATA_DIR" -m fast -w -t 20 stop >/dev/null 2>&1
    fi
    pids=$(marked_pids)
    for pid in $pids; do kill -TERM "$pid" 2>/dev/null; done
    for _ in $(seq 1 20); do
        pids=$(marked_pids)
        [[ -z "$pids" ]] && break
        sleep 0.5
    done
    for pid in $pids "${DIRECT_PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null; done
    sleep 0.5
    pids=$(marked_pids)
    [[ -n "$pids" ]] && log "still running after KILL: $pids"
    # Keep the logs of a failed run next to the screenshots.
    if (( PASSED != 1 )); then
        mkdir -p "$ARTIFACTS/logs" && cp "$WORK"/*.log "$ARTIFACTS/logs/" 2>/dev/null
        for f in "$WORK"/*.log; do [[ -f "$f" ]] && { echo "--- tail $f"; tail -n 25 "$f"; }; done
    fi
    rm -rf "$WORK"
    log "runtime $(( $(date +%s) - STARTED_AT )) s"
    if (( PASSED == 1 && rc == 0 )); then
        echo "PASS"
    else
        echo "FAIL: $STEP"
        exit 1
    fi
}
trap stop_everything EXIT
trap 'exit 130' INT TERM

free_ports() {  # free_ports N -> N distinct free TCP ports on 127.0.0.1
    "$PY" - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

wait_http() {  # wait_http URL SECONDS
    local deadline=$(( $(date +%s) + $2 ))
    until curl -fs -o /dev/null "$1"; do
        (( $(date +%s) < deadline )) || { log "timed out waiting for $1"; return 1; }
        sleep 1
    done
}

# ---------------------------------------------------------------------------------------
step "1 postgresql"
# Debian packages the run needs: PostgreSQL for Prefect, Chromium for the browser check (step 7).
NEED_APT=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || NEED_APT+=(postgresql)
[[ -x /usr/bin/chromium ]] || NEED_APT+=(chromium)
if (( ${#NEED_APT[@]} )); then
    log "installing ${NEED_APT[*]} with apt-get"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${NEED_APT[@]}" >/dev/null
fi
PGBIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
read -r PG_PORT PREFECT_PORT RAY_PORT <<<"$(free_ports 3)"
PGDATA_DIR="$WORK/pg"
mkdir -p "$PGDATA_DIR" && chown postgres: "$WORK" "$PGDATA_DIR" && chmod 700 "$PGDATA_DIR"
runuser -u postgres -- "$PGBIN/initdb" -D "$PGDATA_DIR" -A trust -U postgres >"$WORK/initdb.log" 2>&1
runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PGDATA_DIR" -l "$WORK/postgres.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $WORK" start >/dev/null
PG_PID="$(head -n 1 "$PGDATA_DIR/postmaster.pid")"
DIRECT_PIDS+=("$PG_PID")
"$PGBIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U postgres prefect
log "postgres on 127.0.0.1:$PG_PORT (pid ${DIRECT_PIDS[-1]}), database prefect"

# ---------------------------------------------------------------------------------------
step "2 prefect server"
export PREFECT_HOME="$WORK/prefect-home"
export PREFECT_API_DATABASE_CONNECTION_URL="postgresql+asyncpg://postgres@127.0.0.1:$PG_PORT/prefect"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS=5
export PREFECT_API_URL="http://127.0.0.1:$PREFECT_PORT/api"
export PREFECT_UI_URL="http://127.0.0.1:$PREFECT_PORT"
export PREFECT_RESULTS_PERSIST_BY_DEFAULT=true     # the worker's flow runs keep their return values
export PREFECT_WORKER_QUERY_SECONDS=3
export PREFECT_LOGGING_LEVEL=INFO
mkdir -p "$PREFECT_HOME"
start_server() {
    "$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT" >>"$WORK/prefect-server.log" 2>&1 &
    SERVER_PID=$!
    DIRECT_PIDS+=("$SERVER_PID")
    wait_http "$PREFECT_API_URL/health" 120
    log "prefect server on $PREFECT_UI_URL (pid $SERVER_PID)"
}
start_server

# ---------------------------------------------------------------------------------------
step "3 ray cluster"
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 RAY_enable_worker_prestart=0
export RAY_TMPDIR="$WORK/r" && mkdir -p "$RAY_TMPDIR/ray"
export RAY_ADDRESS="127.0.0.1:$RAY_PORT"
OBJECT_STORE=$((78 * 1024 * 1024))
# Worker port ranges (100 per node) sit below the kernel's ephemeral range, where free_ports
# draws every other port, so the two can never collide.
EPHEMERAL_LOW=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
WPORT=$(( 10000 + (RANDOM % ((EPHEMERAL_LOW - 10400) / 100)) * 100 ))
start_ray_node() {  # start_ray_node NAME INDEX [VAR=VALUE ...]: extra environment for this node only
    local name="$1" i="$2" tmp="$WORK/n$2" role_args ports node_env=("${@:3}")
    mkdir -p "$tmp"
    read -r -a ports <<<"$(free_ports 6)"
    if [[ "$i" == 0 ]]; then
        role_args=($("$BIN/grid" node ray-args "$name") --port="$RAY_PORT" --include-dashboard=false
                   --ray-client-server-port="${ports[5]}")
    else
        role_args=($("$BIN/grid" node ray-args "$name" --address "$RAY_ADDRESS"))
    fi
    env "${node_env[@]}" "$BIN/ray" start "${role_args[@]}" --temp-dir="$tmp" --disable-usage-stats \
        --node-ip-address=127.0.0.1 --object-store-memory="$OBJECT_STORE" \
        --node-manager-port="${ports[0]}" --object-manager-port="${ports[1]}" \
        --metrics-export-port="${ports[2]}" --dashboard-agent-listen-port="${ports[3]}" \
        --dashboard-agent-grpc-port="${ports[4]}" --runtime-env-agent-port="$(free_ports 1)" \
        --min-worker-port=$(( WPORT + i * 100 )) --max-worker-port=$(( WPORT + i * 100 + 99 )) \
        >>"$WORK/ray-start-$name.log" 2>&1 || { log "ray start $name failed"; tail -n 20 "$WORK/ray-start-$name.log"; return 1; }
    log "ray node $name started ($(echo $(marked_pids) | wc -w) marked processes so far)"
}
start_ray_node gpu-master 0
# gpu1's probe reads a GPU whose load a file sets (scripts/e2e_gpu: the nodes share this
# machine's CPU and memory, so only a GPU reading can tell them apart). Step 5b loads it.
GPU1_LOAD="$WORK/gpu1-gpu-load" && echo 0 >"$GPU1_LOAD"
start_ray_node gpu1 1 "PYTHONPATH=$REPO/scripts/e2e_gpu${PYTHONPATH:+:$PYTHONPATH}" \
    "GRID_GPU_PROBE=e2e_fake_gpu:FileLoadedGpu" "GRID_E2E_GPU_LOAD_FILE=$GPU1_LOAD"
start_ray_node gpu2 2
"$PY" scripts/e2e_verify.py ray-nodes gpu-master gpu1 gpu2

# ---------------------------------------------------------------------------------------
step "4 blocks, work pool, deployments, worker"
"$BIN/grid" blocks apply blocks/cluster.yaml
export GRID_FLOWS_ROOT="$REPO"
"$BIN/prefect" work-pool create grid-pool --type process >/dev/null
"$BIN/prefect" --no-prompt deploy --all --prefect-file deployments/prefect.yaml >"$WORK/deploy.log" 2>&1 \
    || { tail -n 30 "$WORK/deploy.log"; exit 1; }
grep -E "Deployment '.*' successfully created" "$WORK/deploy.log" | sed 's/^/  /' || true
# A background job of a non-interactive shell starts with SIGINT ignored, and Prefect's worker
# turns its first TERM into a SIGINT to itself: restore SIGINT so that first TERM stops it
# gracefully (it finishes the flow runs it started), instead of needing a second one (SIGKILL).
( trap - INT; exec "$BIN/prefect" worker start --pool grid-pool --name e2e-worker >>"$WORK/worker.log" 2>&1 ) &
WORKER_PID="$!" && DIRECT_PIDS+=("$WORKER_PID")
log "worker started (pid $WORKER_PID)"

# ---------------------------------------------------------------------------------------
step "5 boosted example deployment"
"$PY" scripts/e2e_verify.py run-example --out "$WORK/example.json"
FLOW_RUN_ID="$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["flow_run_id"])' "$WORK/example.json")"
STEP="5 boost released"
"$BIN/grid" boost status --json --all >"$WORK/status-after-example.json"
"$PY" scripts/e2e_verify.py released --example "$WORK/example.json" --status "$WORK/status-after-example.json"
STEP="5 expire flow ran on schedule"
"$PY" scripts/e2e_verify.py expire-ran --timeout 120
STEP="5 rebalance samples every node on its schedule"
"$PY" scripts/e2e_verify.py rebalance-sampled gpu-master gpu1 gpu2 --timeout 180

# ---------------------------------------------------------------------------------------
step "5b a lender made busy is seen as busy"
"$BIN/grid" boost request gpu-master --cpu 1 --source gpu1 --duration 20m --json >"$WORK/lent-by-gpu1.json"
LENT_ID="$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["id"])' "$WORK/lent-by-gpu1.json")"
echo 100 >"$GPU1_LOAD"
log "boost $LENT_ID lent by gpu1; gpu1's GPU now reads 100 % busy"
"$PY" scripts/e2e_verify.py lender-busy gpu1 gpu2 --boost "$LENT_ID" --timeout 240
echo 0 >"$GPU1_LOAD"

# ---------------------------------------------------------------------------------------
step "6 prefect server restart with a live boost"
"$BIN/grid" boost request gpu-master --cpu 1 --source gpu2 --duration 20m --json >"$WORK/live-boost.json"
LIVE_ID="$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["id"])' "$WORK/live-boost.json")"
log "live boost $LIVE_ID (gpu2 -> gpu-master, 1 CPU)"
# Grants keep coming while the server is away: each either fails clearly or is durable.
"$PY" scripts/e2e_verify.py grant-loop --until "$WORK/server-back" --out "$WORK/grants.json" >"$WORK/grant-loop.log" 2>&1 &
GRANT_LOOP_PID=$! && DIRECT_PIDS+=("$GRANT_LOOP_PID")
sleep 8  # grants before the restart
DOWN_AT="$(date +%s.%N)"
kill -TERM "$SERVER_PID"
for _ in $(seq 1 30); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.5; done
kill -0 "$SERVER_PID" 2>/dev/null && { log "server did not stop on TERM"; exit 1; }
log "server stopped"
sleep 3
start_server
UP_AT="$(date +%s.%N)" && touch "$WORK/server-back"
"$BIN/grid" boost status --json >"$WORK/status-after-restart.json"
"$PY" scripts/e2e_verify.py active "$LIVE_ID" --status "$WORK/status-after-restart.json"
STEP="6 grants during the restart: refused clearly or durable"
wait "$GRANT_LOOP_PID" || { cat "$WORK/grant-loop.log"; exit 1; }
"$PY" scripts/e2e_verify.py grants-durable --grants "$WORK/grants.json" --down "$DOWN_AT" --up "$UP_AT"

# ---------------------------------------------------------------------------------------
step "7 browser check of the Prefect UI"
"$PY" scripts/e2e_check.py --ui "$PREFECT_UI_URL" --flow-run "$FLOW_RUN_ID" \
    --example "$WORK/example.json" --live "$WORK/live-boost.json" --out "$ARTIFACTS"

step "8 release the live boost"
"$BIN/grid" boost release "$LIVE_ID"
"$BIN/grid" boost status --json --all >"$WORK/status-final.json"
"$PY" scripts/e2e_verify.py released-id "$LIVE_ID" --status "$WORK/status-final.json"
"$BIN/grid" boost status --all

step "9 a lender dies: its boost is lost and the Automation runs grid-reconcile"
"$BIN/grid" boost request gpu-master --cpu 1 --source gpu2 --duration 20m --json >"$WORK/doomed-boost.json"
DOOMED_ID="$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["id"])' "$WORK/doomed-boost.json")"
KILLED_AT="$(date +%s.%N)"
pkill -KILL -f -- "$WORK/n2/" || true   # gpu2's raylet and agents (its workers die with the raylet)
log "gpu2's Ray node killed; boost $DOOMED_ID was lent by it"
# Ray marks a node dead 12-15 s after its raylet stops answering (its default health check).
"$PY" scripts/e2e_verify.py automation-fired --boost "$DOOMED_ID" --since "$KILLED_AT" --timeout 45

STEP="done"
PASSED=1
