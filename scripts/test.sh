#!/usr/bin/env bash
# The whole test suite: installs the package and its test dependencies into ./.venv and
# the pinned Node SDK into tests/e2e/node (each only when missing or when pyproject.toml /
# package-lock.json changed: scripts/venv.sh) and PostgreSQL's server binaries (apt, when
# missing), then runs pytest (functional tests in-process,
# end-to-end tests against `versionstore serve` started as a process, driven by the official
# Python and Node SDKs). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/venv.sh
source scripts/venv.sh
ensure_venv test
# The official Node SDK, pinned by tests/e2e/node/package-lock.json (Node ships with the machine).
node_dir=tests/e2e/node
if ! command -v npm >/dev/null; then
  echo "npm not found: tests/e2e/test_node_sdk.py will fail" >&2
elif ! stamp_matches "$node_dir/node_modules/.installed" "$node_dir/package-lock.json"; then
  (cd "$node_dir" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  file_hash "$node_dir/package-lock.json" > "$node_dir/node_modules/.installed"
fi
# Debian's chromium for the console's browser tests (tests/e2e/test_console.py): Playwright's own
# browser download cannot work here, so the tests pass /usr/bin/chromium as the executable.
if ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y chromium >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y chromium >/dev/null; }
  else
    echo "chromium not found (apt-get install chromium): tests/e2e/test_console.py will fail" >&2
  fi
fi
# PostgreSQL server binaries for the metadata tests (tests/servers.py starts a throwaway
# cluster with initdb + pg_ctl; it finds them on PATH or in /usr/lib/postgresql/*/bin).
if ! command -v initdb >/dev/null && ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
  echo "installing postgresql-15 (server binaries for the metadata tests)" >&2
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq postgresql-15 >/dev/null
fi
exec .venv/bin/python -m pytest -q "$@"
