#!/usr/bin/env bash
# Web assets for the console page: xterm.js and its fit addon from npm (pinned
# exactly in package.json, locked in package-lock.json), copied into the
# package's static/vendor/ so the daemon (and the wheel) serve them without any
# CDN.  Idempotent and quick when nothing changed:
#   - `npm ci` runs only when node_modules is missing or the lock file changed;
#   - files are copied only when their content differs.
set -euo pipefail
cd "$(dirname "$0")/.."

vendor=src/serialmuxd/static/vendor
stamp=node_modules/.serialmuxd-lock.sha256
lock_hash="$(sha256sum package-lock.json | cut -d' ' -f1)"

if [ ! -d node_modules/@xterm/xterm ] || [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$lock_hash" ]; then
  command -v npm >/dev/null 2>&1 || {
    echo "build-web: npm is not installed (Debian: apt-get install npm)" >&2
    exit 1
  }
  echo "build-web: npm ci (package-lock.json changed or node_modules missing)"
  npm ci --no-audit --no-fund --ignore-scripts --loglevel=error
  echo "$lock_hash" > "$stamp"
fi

mkdir -p "$vendor"
copy() {
  local src="$1" dst="$vendor/$2"
  if [ ! -f "$src" ]; then
    echo "build-web: $src is missing after npm ci: is package.json pinned to a version that ships it?" >&2
    exit 1
  fi
  if ! cmp -s "$src" "$dst"; then
    cp "$src" "$dst.tmp" && mv "$dst.tmp" "$dst"
    echo "build-web: updated $dst"
  fi
}
copy node_modules/@xterm/xterm/lib/xterm.js xterm.js
copy node_modules/@xterm/xterm/css/xterm.css xterm.css
copy node_modules/@xterm/addon-fit/lib/addon-fit.js addon-fit.js
# Licences travel with the copies.
copy node_modules/@xterm/xterm/LICENSE LICENSE.xterm
copy node_modules/@xterm/addon-fit/LICENSE LICENSE.addon-fit
