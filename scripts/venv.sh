# Sourced by serve.sh and test.sh (from the repository root): build ./.venv once, and install
# into it only when needed. A stamp records the SHA-256 of the file an install was made from
# (pyproject.toml, the Node lockfile); the same hash next time means nothing to do. Delete the
# stamp (or .venv) to force a reinstall.

# file_hash FILE: its SHA-256, hex (python, so it works wherever the venv does).
file_hash() {
  "${VENV_PYTHON:-.venv/bin/python}" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$1"
}

# stamp_matches STAMP FILE: true when STAMP holds FILE's current hash.
stamp_matches() {
  [ -f "$1" ] && [ "$(cat "$1")" = "$(file_hash "$2")" ]
}

# ensure_venv EXTRA: .venv with the package installed (EXTRA "test" adds the test dependencies;
# "base" is the package alone, also satisfied by a "test" install of the same pyproject.toml).
ensure_venv() {
  local extra=$1 python=${PYTHON:-python3.11}
  command -v "$python" >/dev/null || python=python3
  [ -x .venv/bin/python ] || "$python" -m venv .venv
  if stamp_matches ".venv/.installed-$extra" pyproject.toml \
    || { [ "$extra" = base ] && stamp_matches .venv/.installed-test pyproject.toml; }; then
    return 0
  fi
  echo "installing versionstore${extra/#base/} into .venv (first run, or pyproject.toml changed)..." >&2
  local spec=.
  [ "$extra" = base ] || spec=".[$extra]"
  .venv/bin/python -m pip install -q --disable-pip-version-check -e "$spec"
  file_hash pyproject.toml > ".venv/.installed-$extra"
}
