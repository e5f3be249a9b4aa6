#!/usr/bin/env bash
# The whole test suite: installs the package and its test dependencies into ./.venv and
# the pinned Node SDK into tests/e2e/node (each only when missing or when pyproject.toml /
# package-lock.json changed: scripts/venv.sh), then runs pytest (functional tests in-process,
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
exec .venv/bin/python -m pytest -q "$@"
