#!/usr/bin/env bash
# The Debian packages the test suite needs, installed when missing.
#
# `make test` runs this first, so the README's one test command works on a
# fresh machine as it does in CI. As root (CI, a container) it installs what
# is missing with apt-get; otherwise it names the command to run and fails,
# in one line, before anything else runs.
set -euo pipefail

# package -> a file it installs (what we check for)
declare -A NEEDED=(
    [chromium]=/usr/bin/chromium  # the dashboard page's browser tests
)

missing=()
for pkg in "${!NEEDED[@]}"; do
    [ -e "${NEEDED[$pkg]}" ] || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "make test needs Debian packages: run 'sudo apt-get install -y ${missing[*]}' first" >&2
    exit 1
fi
echo "installing ${missing[*]} (needed by the tests) ..." >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
