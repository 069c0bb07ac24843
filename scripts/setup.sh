#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian machine: system packages, the venv,
# the web assets and the QEMU test guest.  Fast when everything is in place.
#   scripts/setup.sh          # what `make demo` needs
#   scripts/setup.sh --test   # plus what the tests need (QEMU, Chromium, socat, nginx…)
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

sudo_cmd=""
[ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"

pkgs=(python3-venv)
command -v node >/dev/null 2>&1 || pkgs+=(nodejs)
command -v npm >/dev/null 2>&1 || pkgs+=(npm)
if [ "$want_test" = 1 ]; then
  pkgs+=(qemu-system-x86 busybox-static socat tmux picocom nginx-light chromium systemd openssl)
fi
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $sudo_cmd apt-get update -qq
  $sudo_cmd apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=600 "${missing[@]}" >/dev/null
fi

# Python venv with the package (editable) and, for tests, the test tools.
extras=""
[ "$want_test" = 1 ] && extras="[test]"
stamp=".venv/.setup-stamp"
hash="$(sha256sum pyproject.toml | cut -c1-16)$extras"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if [ ! -f "$stamp" ] || ! grep -qxF "$hash" "$stamp"; then
  echo "setup: installing Python packages$extras"
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e ".$extras"
  echo "$hash" > "$stamp"
fi

# Web assets (xterm.js from npm, pinned by package-lock.json).
if [ -f scripts/build-web.sh ]; then
  bash scripts/build-web.sh
fi

if [ "$want_test" = 1 ]; then
  bash scripts/build-guest.sh
fi
