#!/usr/bin/env bash
# Builds the policy service's container image (Containerfile) with podman; it holds the
# gateway URL's aggregator too (deploy/kubernetes/aggregator.yaml runs it):
#   scripts/image.sh [TAG]      default TAG: localhost/mcpguard-policy:dev
# MCPGUARD_IMAGE_PROFILE picks the cargo profile of its binaries: `release` (the
# default, the image to ship) or `image-test` (the image test's quick build).
# Installs what only this needs when missing, as scripts/bootstrap.sh does (Debian, as
# root; otherwise it names what to install): podman, musl-tools (musl-gcc, for the
# bundled SQLite's C code), and the rustup target x86_64-unknown-linux-musl. `make
# test` needs none of them.
set -euo pipefail

tag=${1:-localhost/mcpguard-policy:dev}
profile=${MCPGUARD_IMAGE_PROFILE:-release}
target=x86_64-unknown-linux-musl
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

missing=()
command -v podman >/dev/null 2>&1 || missing+=(podman)
command -v musl-gcc >/dev/null 2>&1 || missing+=(musl-tools)
if ((${#missing[@]} != 0)); then
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
        echo "image: missing: ${missing[*]}; install them, e.g." >&2
        echo "    sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null
fi
rustup target list --installed | grep -qx "$target" || rustup target add "$target"

# Static: musl links statically by default; the C parts are built with musl-gcc.
CC_x86_64_unknown_linux_musl=musl-gcc \
    cargo build --profile "$profile" --target "$target" -p mcpguard-policy -p mcpguard-aggregator
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
for name in mcpguard-policy mcpguard-aggregator; do
    bin=${CARGO_TARGET_DIR:-target}/$target/$profile/$name
    if ldd "$bin" 2>&1 | grep -q '=>'; then
        echo "image: $bin is not static:" >&2
        ldd "$bin" >&2
        exit 1
    fi
    cp "$bin" "$stage/$name"
done
mkdir "$stage/data"
podman build --quiet -f Containerfile -t "$tag" "$stage"
echo "image: built $tag ($(du -ch "$stage"/mcpguard-* | tail -1 | cut -f1) of binaries)"
