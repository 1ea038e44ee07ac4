#!/usr/bin/env bash
# A multi-node Ray cluster on this one machine: a head and N worker nodes on loopback, each
# its own `ray start --block` process, recorded and stopped by its own process id (never
# `ray stop`, which would also stop every other Ray on the machine).
#
#   cluster/local.sh start 2          # head + 2 workers; prints RAY_ADDRESS and the dashboard
#   raylab run configs/quickstart.yaml --address 127.0.0.1:6390
#   ray job submit --address http://127.0.0.1:8290 --working-dir . -- raylab run configs/quickstart.yaml
#   cluster/local.sh status
#   cluster/local.sh stop
#
# Environment: PORT (GCS, default 6390), DASHBOARD_PORT (8290), CLIENT_PORT (Ray Client, 10001),
# AGENT_PORT (the head's dashboard agent, which runs jobs, 52365; worker i uses AGENT_PORT+i), CPUS_PER_NODE (1),
# STATE_DIR (.ray-local: pid files and logs), TEMP_DIR (the head's Ray temp dir, Ray's default
# /tmp/ray unless set; `address=auto` only finds a head in the default one). Authentication follows RAY_AUTH_MODE (token by
# default, as raylab does); the token is ~/.ray/auth_token or RAY_AUTH_TOKEN.
set -euo pipefail
PORT="${PORT:-6390}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8290}"
CPUS="${CPUS_PER_NODE:-1}"
# Every node's dashboard agent needs its own port on one machine; the head's runs the jobs.
AGENT="${AGENT_PORT:-52365}"
STATE="${STATE_DIR:-.ray-local}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}" RAY_USAGE_STATS_ENABLED=0
# `stop` ends every node at once, so a node has nowhere to drain to: Ray 2.60 would wait the
# full 30 s drain on SIGTERM whenever a detached actor (Serve) lives on it.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}"
# The head's Ray Client proxy waits this long for each session's server process (Ray's default
# 30 s); a busy small machine has taken 37 s to start that one Python process.
export RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S="${RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S:-90}"
RAY="${RAY:-ray}"

wait_for() {  # wait_for N: until N nodes are alive
    for _ in $(seq 1 120); do
        alive=$(python - "$PORT" <<'PY' 2>/dev/null || echo 0
import sys, ray
ray.init(address=f"127.0.0.1:{sys.argv[1]}", logging_level="ERROR")
print(sum(1 for n in ray.nodes() if n["Alive"]))
PY
)
        [ "${alive:-0}" -ge "$1" ] && return 0
        if ! kill -0 "$(cat "$STATE/head.pid")" 2>/dev/null; then  # it exited: waiting is pointless
            echo "local.sh: the head node exited; the end of $STATE/head.log:" >&2
            tail -5 "$STATE/head.log" >&2
            return 1
        fi
        sleep 1
    done
    echo "local.sh: only ${alive:-0} of $1 nodes came up; logs in $STATE/" >&2
    return 1
}

start() {
    local workers="${1:-1}"
    mkdir -p "$STATE"
    if [ -f "$STATE/head.pid" ] && kill -0 "$(cat "$STATE/head.pid")" 2>/dev/null; then
        echo "local.sh: a cluster is already running here (cluster/local.sh stop first)" >&2
        exit 2
    fi
    if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ] && [ -z "${RAY_AUTH_TOKEN_PATH:-}" ] \
        && [ ! -f "$HOME/.ray/auth_token" ]; then
        # `ray start` with token auth refuses to start without one (only `ray.init` makes it);
        # on a fresh machine make it here, as Ray's error message says to
        "$RAY" get-auth-token --generate > /dev/null
        echo "local.sh: created the cluster's token in ~/.ray/auth_token" >&2
    fi
    nohup "$RAY" start --head --block --port="$PORT" --num-cpus="$CPUS" --node-ip-address=127.0.0.1 \
        --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --ray-client-server-port="${CLIENT_PORT:-10001}" \
        --dashboard-agent-listen-port="$AGENT" --resources='{"node_0": 1}' ${TEMP_DIR:+--temp-dir="$TEMP_DIR"} \
        > "$STATE/head.log" 2>&1 &
    echo $! > "$STATE/head.pid"
    wait_for 1
    for i in $(seq 1 "$workers"); do
        # Each worker its own temp dir, as on separate machines: nodes sharing one would also
        # share runtime_resources/, where two nodes unpacking a job's working_dir race.
        nohup "$RAY" start --block --address="127.0.0.1:$PORT" --num-cpus="$CPUS" --node-ip-address=127.0.0.1 \
            --temp-dir="$(worker_temp "$i")" --resources="{\"node_$i\": 1}" \
            --dashboard-agent-listen-port=$((AGENT + i)) \
            > "$STATE/worker$i.log" 2>&1 &
        echo $! > "$STATE/worker$i.pid"
    done
    wait_for $((workers + 1))
    echo "RAY_ADDRESS=127.0.0.1:$PORT"
    echo "dashboard / jobs: http://127.0.0.1:$DASHBOARD_PORT"
    echo "Ray Client: ray://127.0.0.1:${CLIENT_PORT:-10001}"
}

worker_temp() {  # worker_temp I: worker I's Ray temp dir
    echo "${TMPDIR:-/tmp}/ray-$PORT-node$1"
}

stop() {
    local pidfile pid pids=() temps=()
    for pidfile in "$STATE"/worker*.pid "$STATE"/head.pid; do
        [ -f "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        # `ray start --block` stops its node's processes when it ends; all nodes at once
        kill -0 "$pid" 2>/dev/null && kill -TERM "$pid" && pids+=("$pid")
        case "$pidfile" in */worker*.pid) i=${pidfile##*/worker}; temps+=("$(worker_temp "${i%.pid}")") ;; esac
        rm -f "$pidfile"
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    done
    # The workers' temp dirs are this script's own (their logs go with them; the head's,
    # Ray's default or TEMP_DIR, is kept).
    [ "${#temps[@]}" -eq 0 ] || rm -rf "${temps[@]}" || true
    echo "local.sh: stopped"
}

status() {
    local pidfile
    for pidfile in "$STATE"/head.pid "$STATE"/worker*.pid; do
        [ -f "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        if kill -0 "$pid" 2>/dev/null; then state=running; else state=gone; fi
        echo "$(basename "$pidfile" .pid): pid $pid $state"
    done
}

case "${1:-}" in
    start) start "${2:-1}" ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: cluster/local.sh start [WORKERS] | stop | status" >&2; exit 2 ;;
esac
