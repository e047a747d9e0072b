#!/usr/bin/env bash
# Sets up the official OpenAI SDKs that tests/sdk.rs drives through tollgate:
#   - target/sdk-venv: a Python venv with tests/sdk/requirements.txt (pinned);
#   - tests/sdk/node_modules: `npm ci` from tests/sdk/package-lock.json.
#
# Idempotent and fast when nothing changed: each half is rebuilt only when it is missing, broken,
# or was built from other pins (a stamp in it holds the SHA-256 of the pin file it was built
# from). Quiet on success but for two lines saying where things are; on failure the installer's
# output and a non-zero exit.
#
#   scripts/sdk-env.sh           install what is missing or stale
#   scripts/sdk-env.sh --check   install nothing: exit 1 naming what is missing or stale
#
# Parallel runs (several test binaries, several worktrees' CI) are serialised by a lock file.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/target/sdk-venv"
sdk="$root/tests/sdk"
requirements="$sdk/requirements.txt"
lockfile="$sdk/package-lock.json"
py_stamp="$venv/.tollgate-sdk-stamp"
node_stamp="$sdk/node_modules/.tollgate-sdk-stamp"

check_only=false
case "${1:-}" in
  "") ;;
  --check) check_only=true ;;
  *) echo "usage: scripts/sdk-env.sh [--check]" >&2; exit 2 ;;
esac

fail() {
  echo "sdk-env: $*" >&2
  exit 1
}

hash_of() {
  sha256sum "$1" | cut -d' ' -f1
}

command -v python3 >/dev/null || fail "python3 not found on PATH"
command -v node >/dev/null || fail "node not found on PATH"
command -v npm >/dev/null || fail "npm not found on PATH"

mkdir -p "$root/target"
exec 9>"$root/target/sdk-env.lock"
flock 9

py_hash="$(hash_of "$requirements")"
node_hash="$(hash_of "$lockfile")"

# The package's metadata, not `import openai` (seconds of CPU): enough to see that the venv's
# interpreter still runs and the SDK is installed.
py_sdk_version() {
  "$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("openai"))' 2>/dev/null
}

python_ok() {
  [[ -x "$venv/bin/python" ]] &&
    [[ "$(cat "$py_stamp" 2>/dev/null)" == "$py_hash" ]] &&
    py_sdk_version >/dev/null
}

node_ok() {
  [[ -f "$sdk/node_modules/openai/package.json" ]] &&
    [[ "$(cat "$node_stamp" 2>/dev/null)" == "$node_hash" ]]
}

if $check_only; then
  missing=()
  python_ok || missing+=("target/sdk-venv (from tests/sdk/requirements.txt)")
  node_ok || missing+=("tests/sdk/node_modules (from tests/sdk/package-lock.json)")
  if ((${#missing[@]} > 0)); then
    for what in "${missing[@]}"; do
      echo "sdk-env: missing or stale: $what" >&2
    done
    fail "run scripts/sdk-env.sh to install the SDKs"
  fi
else
  if ! python_ok; then
    # A venv built by another python3, or half-built, is not worth repairing.
    rm -rf "$venv"
    python3 -m venv "$venv" || fail "python3 -m venv $venv failed"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-input \
      -r "$requirements" || fail "pip install -r tests/sdk/requirements.txt failed"
    echo "$py_hash" >"$py_stamp"
  fi
  if ! node_ok; then
    # npm ci removes node_modules first, the stamp with it.
    npm ci --prefix "$sdk" --no-audit --no-fund --loglevel=error >/dev/null ||
      fail "npm ci --prefix tests/sdk failed"
    echo "$node_hash" >"$node_stamp"
  fi
fi

py_version="$(py_sdk_version)"
node_version="$(node -p 'require(process.argv[1]).version' "$sdk/node_modules/openai/package.json")"
echo "sdk-env: python $venv/bin/python (openai $py_version)"
echo "sdk-env: node $(command -v node) $(node --version), $sdk/node_modules (openai $node_version)"
