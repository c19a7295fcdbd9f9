#!/usr/bin/env bash
# Renders deploy/ into OUT_DIR with what differs per release: the filter's .wasm URL and
# its sha256 (computed here from the very file you publish at that URL), and the policy
# service's image. The files in deploy/ carry placeholders (@WASM_URL@, @WASM_SHA256@,
# @POLICY_IMAGE@) on purpose: applied unrendered they fail (an image that does not
# exist; a module whose checksum cannot match, which Istio refuses to load and, with
# failStrategy FAIL_CLOSE, refuses traffic instead of passing it).
#
#   scripts/render-deploy.sh OUT_DIR WASM_FILE WASM_URL POLICY_IMAGE
#   (or: make deploy-manifests WASM_URL=https://... POLICY_IMAGE=registry/...:tag)
set -euo pipefail

if (($# != 4)); then
    echo "usage: $0 OUT_DIR WASM_FILE WASM_URL POLICY_IMAGE" >&2
    exit 2
fi
out=$1 wasm=$2 url=$3 image=$4
root=$(cd "$(dirname "$0")/.." && pwd)

[[ -s $wasm ]] || { echo "render-deploy: no .wasm at $wasm (make build)" >&2; exit 1; }
# Plain characters only: the values are substituted into YAML as they are.
[[ $url =~ ^https?://[A-Za-z0-9._~:/@%+=-]+$ ]] \
    || { echo "render-deploy: WASM_URL must be an http(s) URL of plain characters, got '$url'" >&2; exit 1; }
[[ $image =~ ^[a-z0-9][A-Za-z0-9._/:@-]*$ ]] \
    || { echo "render-deploy: POLICY_IMAGE must be an image reference, got '$image'" >&2; exit 1; }
sha=$(sha256sum "$wasm" | cut -d' ' -f1)

for dir in kubernetes istio; do
    mkdir -p "$out/$dir"
    for f in "$root/deploy/$dir"/*.yaml; do
        sed -e "s|@WASM_URL@|$url|g" -e "s|@WASM_SHA256@|$sha|g" -e "s|@POLICY_IMAGE@|$image|g" \
            "$f" >"$out/$dir/$(basename "$f")"
    done
done
if grep -rn '@[A-Z0-9_]*@' "$out"; then
    echo "render-deploy: placeholders left in $out (above)" >&2
    exit 1
fi
echo "render-deploy: $out (filter sha256 $sha)"
