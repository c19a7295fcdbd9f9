#!/usr/bin/env bash
# `make run`: a local mcpguard gateway from the debug builds and the venv's Envoy.
#   policy service  127.0.0.1:8080 (admin API), 127.0.0.1:8081 (checks); data in data/
#   demo MCP server 127.0.0.1:9100/mcp
#   Envoy           127.0.0.1:10000 (data plane), 127.0.0.1:9901 (admin)
# Logs go to .run/*.log. Seeds (idempotently) gateway `demo` exposing server `demo`.
# Ctrl-C or SIGTERM, or any of the three exiting, stops all of them.
set -euo pipefail
cd "$(dirname "$0")/.."

ENVOY=${MCPGUARD_ENVOY:-.venv/bin/envoy}
DATA_DIR=data
RUN_DIR=.run
ADMIN_URL=http://127.0.0.1:8080
MCP_URL=http://127.0.0.1:10000/mcp/demo/demo
STARTUP_TIMEOUT=60 # seconds, for each of the three to become ready

die() {
    echo "run: $*" >&2
    exit 1
}

for f in target/debug/mcpguard-policy target/debug/mcpguard-demo-mcp \
    target/wasm32-wasip1/release/mcpguard_filter.wasm "$ENVOY"; do
    [[ -e $f ]] || die "$f is missing: run \`make run\` (it builds and installs first)"
done

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for port in 8080 8081 9100 10000 9901; do
    if port_in_use "$port"; then
        die "port 127.0.0.1:$port is already in use (an earlier \`make run\` still up?); find the owner with: ss -ltnp 'sport = :$port'"
    fi
done

# --- processes -------------------------------------------------------------------

declare -A pids=() # name -> pid
names=()           # start order

stop_all() {
    trap - INT TERM EXIT
    local name pid i
    for ((i = ${#names[@]} - 1; i >= 0; i--)); do
        name=${names[i]}
        pid=${pids[$name]}
        if [[ $name == envoy ]]; then
            kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
        else
            kill -TERM "$pid" 2>/dev/null || true
        fi
    done
    for ((i = 0; i < 100; i++)); do # up to 10 s for a clean exit
        any_alive || break
        sleep 0.1
    done
    for name in "${names[@]}"; do
        if alive "${pids[$name]}"; then
            echo "run: $name did not stop on SIGTERM; killing it" >&2
            kill -KILL "${pids[$name]}" 2>/dev/null || true
        fi
    done
    wait 2>/dev/null || true
}
trap 'echo; echo "run: stopping"; stop_all; exit 130' INT
trap 'echo "run: stopping"; stop_all; exit 143' TERM
trap stop_all EXIT

# A zombie still answers `kill -0`, so look at the state in /proc too.
alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]]
}
any_alive() {
    local name
    for name in "${names[@]}"; do alive "${pids[$name]}" && return 0; done
    return 1
}

start() { # name command...
    local name=$1
    shift
    "$@" >"$RUN_DIR/$name.log" 2>&1 &
    pids[$name]=$!
    names+=("$name")
}

fail_start() { # name why
    if [[ -s $RUN_DIR/$1.log ]]; then
        echo "run: $1 $2; the end of $RUN_DIR/$1.log:" >&2
        tail -n 20 "$RUN_DIR/$1.log" | sed 's/^/    /' >&2
    else
        echo "run: $1 $2 ($RUN_DIR/$1.log is empty)" >&2
    fi
    exit 1
}

wait_ready() { # name probe-command...
    local name=$1 deadline=$((SECONDS + STARTUP_TIMEOUT))
    shift
    until "$@" >/dev/null 2>&1; do
        alive "${pids[$name]}" || fail_start "$name" "exited during start-up"
        ((SECONDS < deadline)) || fail_start "$name" "was not ready after ${STARTUP_TIMEOUT}s"
        sleep 0.2
    done
}

# The logs hold what the services print, the bootstrap admin token among it: only
# this user may read them, also when .run/ or a log was left by an older run with
# looser modes (a mode is applied only when a file is created).
umask 077
mkdir -p "$RUN_DIR"
chmod 700 "$RUN_DIR"
chmod 600 "$RUN_DIR"/*.log 2>/dev/null || true
start policy env NO_COLOR=1 target/debug/mcpguard-policy \
    --public-listen 127.0.0.1:8080 --check-listen 127.0.0.1:8081 --data-dir "$DATA_DIR"
start demo-mcp target/debug/mcpguard-demo-mcp --listen 127.0.0.1:9100
wait_ready policy curl -fsS --max-time 2 "$ADMIN_URL/healthz"
wait_ready policy curl -fsS --max-time 2 http://127.0.0.1:8081/healthz
# Envoy proves itself to the check port with the secret the policy service made on
# its first start (envoy/mcpguard.yaml reads it from this variable); exported, not
# passed as an argument, so it is not on any command line.
[[ -s $DATA_DIR/check-secret ]] || die "$DATA_DIR/check-secret is missing after the policy service started"
MCPGUARD_CHECK_SECRET=$(tr -d '[:space:]' <"$DATA_DIR/check-secret")
export MCPGUARD_CHECK_SECRET
# Envoy in its own session, so terminal signals and our shell's exit do not reach it
# unasked (see docs). The launcher records its PID, then execs Envoy (the venv's
# `envoy` execs the real binary in turn), so the recorded PID is Envoy's.
# shellcheck disable=SC2016 # $$ and $@ are the launcher's own
start envoy setsid bash -c 'echo $$ >"$0"; exec "$@"' "$RUN_DIR/envoy.pid" \
    "$ENVOY" -c envoy/mcpguard.yaml --concurrency 1 --disable-hot-restart --log-level warn

wait_ready demo-mcp port_in_use 9100
wait_ready envoy curl -fsS --max-time 2 http://127.0.0.1:9901/ready
[[ $(cat "$RUN_DIR/envoy.pid") == "${pids[envoy]}" ]] ||
    die "Envoy's PID is $(cat "$RUN_DIR/envoy.pid"), not ${pids[envoy]} as expected"

# --- seeding: gateway `demo` exposing server `demo` ------------------------------

if [[ -s $DATA_DIR/bootstrap-admin-token ]]; then
    ADMIN_TOKEN=$(tr -d '[:space:]' <"$DATA_DIR/bootstrap-admin-token")
    TOKEN_SOURCE="$PWD/$DATA_DIR/bootstrap-admin-token"
elif [[ -n ${MCPGUARD_BOOTSTRAP_ADMIN_TOKEN:-} ]]; then
    ADMIN_TOKEN=$MCPGUARD_BOOTSTRAP_ADMIN_TOKEN
    # shellcheck disable=SC2016 # shown as is
    TOKEN_SOURCE='$MCPGUARD_BOOTSTRAP_ADMIN_TOKEN'
else
    die "no admin token: $DATA_DIR/bootstrap-admin-token is missing and MCPGUARD_BOOTSTRAP_ADMIN_TOKEN is unset (remove $DATA_DIR/ to start over)"
fi

# api METHOD PATH [JSON]: sets $status and $body. The admin token reaches curl on
# stdin, not on its command line.
api() {
    local out
    out=$(printf 'header = "authorization: Bearer %s"\n' "$ADMIN_TOKEN" |
        curl -sS --max-time 10 -K - -X "$1" "$ADMIN_URL$2" -H 'content-type: application/json' \
            ${3:+--data "$3"} -w '\n%{http_code}') || die "$1 $2 failed"
    status=${out##*$'\n'}
    body=${out%$'\n'*}
}
# expect STATUS...: fails unless $status is one of them.
expect() {
    [[ " $* " == *" $status "* ]] || die "admin API answered $status: $body"
}
# id_of SLUG: the id of the element with that slug in the JSON list in $body.
id_of() {
    python3 -c 'import json, sys
print(next((x["id"] for x in json.loads(sys.argv[2]) if x.get("slug") == sys.argv[1]), ""))' \
        "$1" "$body"
}

api POST /api/v1/gateways '{"name":"Demo","slug":"demo"}'
expect 201 409
api GET /api/v1/gateways
expect 200
gateway_id=$(id_of demo)

api POST /api/v1/servers \
    '{"name":"Demo MCP server","slug":"demo","upstream_url":"http://127.0.0.1:9100/mcp"}'
expect 201 409
api GET /api/v1/servers
expect 200
server_id=$(id_of demo)
[[ -n $gateway_id && -n $server_id ]] || die "gateway or server \`demo\` not found after creating it"

api PUT "/api/v1/gateways/$gateway_id/servers/$server_id" '{"identity":"shared"}'
expect 200

# --- what next -------------------------------------------------------------------

if [[ $TOKEN_SOURCE == /* ]]; then
    token_line="export ADMIN_TOKEN=\$(cat $TOKEN_SOURCE)"
else
    token_line="export ADMIN_TOKEN=\"\$MCPGUARD_BOOTSTRAP_ADMIN_TOKEN\""
fi
# A one-time way in for `owner`, so that a newcomer needs no curl: the link signs in
# once, within 15 minutes (`mcpguard-policy console-link` makes another).
console_link=$(target/debug/mcpguard-policy --data-dir "$DATA_DIR" --issuer "$ADMIN_URL" console-link) \
    || die "could not make a console sign-in link"

cat <<EOF

mcpguard is running.
  admin console  $ADMIN_URL/console
                 sign in as owner with this one-time link (works once, for 15 minutes):
                 $console_link
                 (another: target/debug/mcpguard-policy --data-dir $DATA_DIR --issuer $ADMIN_URL console-link)
  MCP endpoint   $MCP_URL   (gateway \`demo\` id $gateway_id, server \`demo\` id $server_id)
  admin API      $ADMIN_URL/api/v1   (admin token: $TOKEN_SOURCE)
  logs           $PWD/$RUN_DIR/{policy,demo-mcp,envoy}.log

In the console: Apps & Agents > create a host > generate a token for the demo gateway
(shown once, with Copy and Download) > use it as the MCP client's bearer token.

The same with the admin API, in another shell:

  $token_line

  # 1. Create a token-based host:
  HOST_ID=\$(curl -s -X POST $ADMIN_URL/api/v1/hosts \\
    -H "authorization: Bearer \$ADMIN_TOKEN" -H 'content-type: application/json' \\
    -d '{"name":"Feedback bot"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')

  # 2. Give it a token on the demo gateway (the response is the only time it is shown):
  TOKEN=\$(curl -s -X POST $ADMIN_URL/api/v1/hosts/\$HOST_ID/tokens \\
    -H "authorization: Bearer \$ADMIN_TOKEN" -H 'content-type: application/json' \\
    -d '{"gateway_id": $gateway_id}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')

  # 3. MCP initialize through Envoy:
  curl -s -X POST $MCP_URL -H 'content-type: application/json' -H 'accept: application/json, text/event-stream' -H "authorization: Bearer \$TOKEN" -d '{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"curl","version":"0"}}}'

A desktop MCP client (headed host, OAuth): give yourself a password, then point the
client at $MCP_URL; it registers itself, you sign in as \`owner\` and allow the gateway,
and the client appears in GET $ADMIN_URL/api/v1/hosts (kind oauth):

  curl -s -X PUT $ADMIN_URL/api/v1/users/1/password \\
    -H "authorization: Bearer \$ADMIN_TOKEN" -H 'content-type: application/json' \\
    -d '{"password":"a long passphrase of yours"}'

Ctrl-C stops everything.
EOF

# --- until Ctrl-C, SIGTERM or one of them exits ------------------------------------

# `wait -n` returns when a child exits, or at once when a trapped signal arrives.
while :; do
    wait -n || true
    for name in "${names[@]}"; do
        alive "${pids[$name]}" || {
            echo "run: $name exited; stopping the rest (see $RUN_DIR/$name.log)" >&2
            exit 1
        }
    done
done
