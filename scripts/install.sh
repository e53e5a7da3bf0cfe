#!/usr/bin/env bash
# Creates .venv with Python 3.12 and installs chipmunk-jax (editable) with the test extras, pinned by
# constraints.txt. Usage: bash scripts/install.sh [extra pip args]
set -euo pipefail
cd "$(dirname "$0")/.."

pick_python() {
  local candidate
  for candidate in "${PYTHON:-}" python3.12 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1; then
      echo "$candidate"; return
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    local v
    v=$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.[0-9]+)?$' | sort -V | tail -n 1 || true)
    if [ -n "$v" ]; then echo "$(pyenv root)/versions/$v/bin/python3"; return; fi
  fi
  echo "error: no Python 3.12 found (tried \$PYTHON, python3.12, python3, pyenv 3.12.x)" >&2
  exit 1
}

PY=$(pick_python)
echo "creating .venv with $PY ($("$PY" --version 2>&1))"
rm -rf .venv
"$PY" -m venv .venv
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test]" "$@"
.venv/bin/python -c "import chipmunk_jax, chipmunk_jax.pallas_kernels, chipmunk_jax.models, chipmunk_jax.ports; print('chipmunk-jax installed in .venv')"
