#!/usr/bin/env bash
# `make bench` needs the `wrk` load generator (Debian package `wrk`). Installs it when
# missing, as root with apt-get (the way scripts/bootstrap.sh installs what the other
# targets need); otherwise names the package to install and fails.
set -euo pipefail

command -v wrk >/dev/null 2>&1 && exit 0

if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    echo "bench: the wrk load generator is missing; install it, then run make bench again:" >&2
    echo "    sudo apt-get install -y --no-install-recommends wrk" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y --no-install-recommends wrk >/dev/null 2>&1 || {
    apt-get update >/dev/null
    apt-get install -y --no-install-recommends wrk >/dev/null
}
command -v wrk >/dev/null
