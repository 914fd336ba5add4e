#!/usr/bin/env bash
# Set up everything `make demo` and `make test` need on a fresh Debian/Ubuntu/Raspberry Pi OS
# machine: Mosquitto (Debian package) and a .venv with knet and its extras.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-}"
EXTRAS="${KNET_EXTRAS:-dev}"

log() { printf '[bootstrap] %s\n' "$*"; }
die() { printf '[bootstrap] ERROR: %s\n' "$*" >&2; exit 1; }

if [ -z "$PYTHON" ]; then
  for candidate in python3.11 python3.12 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then PYTHON="$candidate"; break; fi
  done
fi
[ -n "$PYTHON" ] || die "no python3 found; install Python 3.11 (apt-get install python3 python3-venv)."
"$PYTHON" - <<'PY' || die "Python >= 3.10 is required (found $("$PYTHON" --version 2>&1))."
import sys
sys.exit(0 if sys.version_info >= (3, 10) else 1)
PY

# --- Mosquitto: the tests and the demo start their own private broker from this binary.
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
      die "mosquitto is not installed and neither root nor sudo is available. Ask an administrator to run: apt-get install mosquitto mosquitto-clients"
    fi
  fi
  command -v apt-get >/dev/null 2>&1 || die "mosquitto is missing and this is not an apt-based system; install Mosquitto >= 2.0 with your package manager."
  log "installing mosquitto (Debian package)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends mosquitto mosquitto-clients >/dev/null
  # We never use the system-wide service: knet starts private brokers. Stop it if apt started one.
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet mosquitto 2>/dev/null; then
    $SUDO systemctl disable --now mosquitto >/dev/null 2>&1 || true
  fi
fi

# --- systemd-analyze: tests/test_device_package.py verifies the unit files and their exposure
# scores with it; tests/test_unit_seccomp.py expands the agent unit's SystemCallFilter= with
# it and loads that filter through libseccomp2 (a dependency of the systemd package).
if ! command -v systemd-analyze >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  log "installing systemd (for systemd-analyze; no service is started)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends systemd >/dev/null
fi

# --- PostgreSQL: tests/pg_helpers.py starts a private server (initdb + postgres in a temp
# folder, as the postgres user when run as root) for the PostgreSQL store, registry and
# replica tests; `knet bench ingest --store postgresql` does the same. Debian keeps the
# server programs in /usr/lib/postgresql/<version>/bin, off PATH.
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
    && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  log "installing postgresql (Debian package; no cluster of its own is used)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends postgresql >/dev/null
  # The package may start a system cluster: knet's tests never use it.
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet postgresql 2>/dev/null; then
    $SUDO systemctl disable --now postgresql >/dev/null 2>&1 || true
  fi
fi

# --- Chromium + chromedriver: tests/test_console_browser.py drives the console in headless
# Chromium through Selenium, pointed at these Debian binaries (no browser download ever).
if { ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; } \
    && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  log "installing chromium and chromium-driver (Debian packages, for the console's browser tests)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
fi

# --- The virtual environment.
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV" || die "could not create a venv; install python3-venv (apt-get install python3-venv)."
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

stamp="$VENV/.knet-installed"
want="$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1) $EXTRAS"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

# torch first and pinned: an unpinned torch resolves to a multi-GB CUDA build.
if [ "$EXTRAS" != "agent" ] && ! "$VENV/bin/python" -c 'import torch' >/dev/null 2>&1; then
  log "installing torch==2.13.0 (CPU build)"
  "${PIP[@]}" install "torch==2.13.0" || die "could not install torch==2.13.0; see https://pytorch.org for a CPU wheel for this platform."
fi
log "installing knet[$EXTRAS] (editable)"
"${PIP[@]}" install -e ".[$EXTRAS]"
echo "$want" > "$stamp"
log "ready: $VENV"
