#!/usr/bin/env bash
# Builds the container image (scripts/image.sh) and runs it the way the Deployment does
# (deploy/kubernetes/policy-deployment.yaml: user 65532, read-only root filesystem,
# a writable /data), then checks what a cluster relies on:
#   - both binaries run from the image (`--version`);
#   - the service starts as 65532, not root, and answers /healthz on its public port;
#   - its admin API answers the bootstrap admin token (so the store and the secrets key
#     were made in /data);
#   - it writes nothing outside /data (the root filesystem is read-only).
# Loopback only (host network, ports chosen here). Part of `make test`, with the
# binaries built in the `image-test` profile (Cargo.toml): the image's make-up is what
# is tested, and a static release build would cost ~15 CPU-minutes (docs/istio.md).
# MCPGUARD_IMAGE_PROFILE=release tests the image `make image` ships.
#
# Sandboxes without full container support (no RLIMIT changes, hybrid cgroups) make
# the default runtime fail before the service starts; then the run is retried with
# runc, the cgroupfs manager and no default ulimits, and says so.
set -euo pipefail

tag=localhost/mcpguard-policy:test
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
MCPGUARD_IMAGE_PROFILE=${MCPGUARD_IMAGE_PROFILE:-image-test} scripts/image.sh "$tag"

name=mcpguard-image-test-$$
public=$((20000 + RANDOM % 20000))
check=$((public + 1))
token=mcpga_imagetest$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
work=$(mktemp -d)
trap 'podman rm -f "$name" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

podman_opts=()
conf=()
runs() { env "${conf[@]}" podman "${podman_opts[@]}" run --rm "$@"; }
if ! out=$(runs "$tag" --version 2>&1); then
    echo "image-test: the default runtime cannot start a container here: $out" >&2
    echo "image-test: retrying with runc, cgroupfs and no default ulimits" >&2
    command -v runc >/dev/null 2>&1 || {
        [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1 ||
            { echo "image-test: install runc" >&2; exit 1; }
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends runc </dev/null
    }
    printf '[containers]\ndefault_ulimits = []\n' >"$work/containers.conf"
    conf=("CONTAINERS_CONF=$work/containers.conf")
    podman_opts=(--runtime runc --cgroup-manager cgroupfs)
    out=$(runs "$tag" --version 2>&1)
fi
echo "image-test: $out"
[[ $out == mcpguard-policy\ * ]] || { echo "image-test: unexpected --version: $out" >&2; exit 1; }
out=$(runs --entrypoint /usr/local/bin/mcpguard-aggregator "$tag" --version 2>&1)
[[ $out == mcpguard-aggregator\ * ]] || { echo "image-test: aggregator --version: $out" >&2; exit 1; }

user=$(podman image inspect "$tag" --format '{{.Config.User}}')
[[ $user == 65532:65532 ]] || { echo "image-test: image user is '$user', not 65532" >&2; exit 1; }

mkdir "$work/data"
chown 65532:65532 "$work/data"
env "${conf[@]}" podman "${podman_opts[@]}" run -d --name "$name" --network host --read-only \
    -v "$work/data:/data" \
    -e MCPGUARD_PUBLIC_LISTEN="127.0.0.1:$public" \
    -e MCPGUARD_CHECK_LISTEN="127.0.0.1:$check" \
    -e MCPGUARD_BOOTSTRAP_ADMIN_TOKEN="$token" \
    "$tag" >/dev/null

ready=
for _ in $(seq 1 100); do
    if curl -fsS "http://127.0.0.1:$public/healthz" >/dev/null 2>&1; then ready=1; break; fi
    sleep 0.1
done
[[ -n $ready ]] || { echo "image-test: no /healthz within 10 s" >&2; podman logs "$name" >&2; exit 1; }

pid=$(podman inspect "$name" --format '{{.State.Pid}}')
uid=$(awk '/^Uid:/ {print $2}' "/proc/$pid/status")
[[ $uid == 65532 ]] || { echo "image-test: the service runs as uid $uid" >&2; exit 1; }

me=$(curl -fsS -H "authorization: Bearer $token" "http://127.0.0.1:$public/api/v1/me")
[[ $me == *'"name":"owner"'* ]] || { echo "image-test: /api/v1/me: $me" >&2; exit 1; }
for f in secrets.key check-secret; do
    [[ -s $work/data/$f ]] || { echo "image-test: /data/$f was not made" >&2; exit 1; }
done
echo "image-test: $tag runs as 65532 on a read-only root; /healthz and the admin API answer"
