#!/usr/bin/env bash
# Runs a command — the end-to-end tests — against PostgreSQL instead of SQLite:
#
#   scripts/postgres.sh cargo test --workspace
#
# With MCPGUARD_TEST_DATABASE=postgres the harness (tests/src/db.rs) starts one
# throwaway PostgreSQL cluster per test process (initdb in a temp dir, loopback, a free
# port, as the `postgres` user when run as root) and gives every policy service it
# starts a fresh database on it. Each cluster is stopped and deleted by a watchdog once
# the test process ends, however it ends. This script gives the run a TMPDIR of its own
# and, when the command is over (or interrupted), waits for those watchdogs and stops
# whatever is left, so that no postgres outlives the run.
# Server binaries: Debian's `postgresql` package (scripts/bootstrap.sh installs it), or
# MCPGUARD_PG_BIN.
set -euo pipefail

if (($# == 0)); then
    echo "usage: $0 COMMAND [ARG...]" >&2
    exit 2
fi

run_tmp=$(mktemp -d "${TMPDIR:-/tmp}/mcpguard-test.XXXXXX")
# The clusters run as the postgres user, in directories under this one.
chmod 1777 "$run_tmp"

clusters_left() { compgen -G "$run_tmp/mcpguard-pg-*" >/dev/null; }

cleanup() {
    local i dir pid
    # The watchdogs stop their clusters within a second or so of the tests exiting.
    for ((i = 0; i < 300; i++)); do
        clusters_left || break
        sleep 0.1
    done
    if clusters_left; then
        for dir in "$run_tmp"/mcpguard-pg-*; do
            pid=$(head -n 1 "$dir/data/postmaster.pid" 2>/dev/null || true)
            if [[ -n $pid ]]; then
                echo "postgres.sh: stopping a PostgreSQL left running in $dir" >&2
                kill -QUIT "$pid" 2>/dev/null || true
            fi
        done
        for ((i = 0; i < 100; i++)); do
            compgen -G "$run_tmp/mcpguard-pg-*/data/postmaster.pid" >/dev/null || break
            sleep 0.1
        done
    fi
    rm -rf "$run_tmp"
}
trap cleanup EXIT

export TMPDIR=$run_tmp MCPGUARD_TEST_DATABASE=postgres
"$@"
