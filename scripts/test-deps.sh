#!/usr/bin/env bash
# The Debian packages the test suite needs, installed when missing.
#
# `make test` runs this first, so the README's one test command works on a
# fresh machine as it does in CI. As root (CI, a container) it installs what
# is missing with apt-get; otherwise it names the command to run and fails,
# in one line, before anything else runs.
#
# TEST_DEPS_NEEDED replaces the list below with "package=/path ..." pairs:
# tests/test_test_deps.py points it at files that do not exist to prove both
# paths (root installs, a user is told how) without touching the real system.
set -euo pipefail

# package -> a file it installs (what we check for: a file test, no dpkg query)
declare -A NEEDED=(
    [chromium]=/usr/bin/chromium  # the dashboard page's browser tests
)
# Later issues will need these; each is as cheap to check (one file test), so
# adding one is a line here once the lead decides:
#   [redis-server]=/usr/bin/redis-server  [mosquitto]=/usr/sbin/mosquitto  [nginx]=/usr/sbin/nginx

if [ -n "${TEST_DEPS_NEEDED:-}" ]; then
    NEEDED=()
    for pair in $TEST_DEPS_NEEDED; do
        NEEDED[${pair%%=*}]=${pair#*=}
    done
fi

missing=()
for pkg in "${!NEEDED[@]}"; do
    [ -e "${NEEDED[$pkg]}" ] || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
# A stable order in messages (an associative array has none).
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort)

if [ "$(id -u)" -ne 0 ]; then
    echo "make test needs Debian packages: run 'sudo apt-get install -y ${missing[*]}' first" >&2
    exit 1
fi
echo "installing ${missing[*]} (needed by the tests) ..." >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
