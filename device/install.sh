#!/bin/sh
# Install knet-agent on this device from this bundle only: no package index is contacted
# (pip --no-index), so every device of a fleet gets the same, pinned wheels.
#   sudo ./install.sh            # /opt/knet/.venv, /etc/knet/agent.toml, the systemd unit
# Settings (environment): KNET_PREFIX (/opt/knet), KNET_ETC (/etc/knet),
# KNET_SYSTEMD_DIR (/etc/systemd/system), PYTHON (python<the profile's version>, python3).
set -eu
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/bundle.env"   # PROFILE, PYTHON_VERSION, EXTRAS
PREFIX="${KNET_PREFIX:-/opt/knet}"
ETC="${KNET_ETC:-/etc/knet}"
UNIT_DIR="${KNET_SYSTEMD_DIR:-/etc/systemd/system}"
if [ -z "${PYTHON:-}" ]; then
  for p in "python$PYTHON_VERSION" python3; do
    if command -v "$p" >/dev/null 2>&1; then PYTHON="$p"; break; fi
  done
fi
[ -n "${PYTHON:-}" ] || { echo "install.sh: no python$PYTHON_VERSION found" >&2; exit 1; }
have="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [ "$have" != "$PYTHON_VERSION" ]; then
  echo "install.sh: this bundle holds wheels for Python $PYTHON_VERSION, $PYTHON is $have" >&2
  exit 1
fi
"$PYTHON" -m venv "$PREFIX/.venv"
"$PREFIX/.venv/bin/python" -m pip install --quiet --no-index --find-links "$here/wheels" \
  --constraint "$here/constraints.txt" "knet-agent[$EXTRAS]"
"$PREFIX/.venv/bin/python" -m pip check
mkdir -p "$ETC/profiles"
[ -e "$ETC/agent.toml" ] || cp "$here/agent.toml" "$ETC/agent.toml"
mkdir -p "$UNIT_DIR"
sed "s#/opt/knet/#$PREFIX/#g" "$here/knet-agent.service" > "$UNIT_DIR/knet-agent.service"
echo "knet-agent installed in $PREFIX/.venv for profile $PROFILE."
echo "Next: edit $ETC/agent.toml, put the MQTT password in $ETC/credentials/mqtt-password,"
echo "then: systemctl daemon-reload && systemctl enable --now knet-agent"
