#!/usr/bin/env bash
# Prometheus and promtool for the tests that check the chart's alert rules and dashboard queries
# against the real thing. Debian bookworm's `prometheus` package (2.42.0; its security updates
# keep that version) is downloaded, not installed: no daemon, no system user, no service. It is
# unpacked under $RAY_VRAM_CACHE/prometheus once; reruns take milliseconds. Links `prometheus` and
# `promtool` into $RAY_VRAM_BIN and prints that folder.
# Usage: bash ci/prometheus.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
source "$ROOT/ci/env.sh"
VERSION=2.42.0
CACHE=$RAY_VRAM_CACHE/prometheus
log() { printf '[prometheus] %s\n' "$*" >&2; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# Downloads the .deb into the current folder; refreshes apt's lists once when they lack it.
download() {
  apt-get download -q prometheus >/dev/null 2>&1 && return 0
  log "refreshing apt's package lists"
  as_root apt-get update -q >/dev/null
  apt-get download -q prometheus >/dev/null
}

unpack() {
  [ -f "$CACHE/.complete" ] && return 0
  local start; start=$(date +%s)
  log "downloading Debian's prometheus package"
  rm -rf "$CACHE"; mkdir -p "$CACHE/deb"
  # apt's sandbox user cannot write into a folder of ours: download into a world-writable one.
  chmod 777 "$CACHE/deb"
  (cd "$CACHE/deb" && download)
  dpkg -x "$CACHE"/deb/prometheus_*.deb "$CACHE/root"
  mkdir -p "$CACHE/bin"
  mv "$CACHE/root/usr/bin/prometheus" "$CACHE/root/usr/bin/promtool" "$CACHE/bin/"
  basename "$CACHE"/deb/prometheus_*.deb >"$CACHE/package"
  rm -rf "$CACHE/deb" "$CACHE/root"   # the web UI's assets and docs are not needed
  touch "$CACHE/.complete"
  log "unpacked $(cat "$CACHE/package") in $(( $(date +%s) - start ))s into $CACHE/bin"
}

exec 9>"$RAY_VRAM_CACHE/.prometheus.lock"; flock 9
unpack
for tool in prometheus promtool; do
  ln -sfn "$CACHE/bin/$tool" "$RAY_VRAM_BIN/$tool"
  "$RAY_VRAM_BIN/$tool" --version 2>&1 | grep -q "version $VERSION" ||
    { log "$tool does not report version $VERSION (Debian's package changed?)"; exit 1; }
done
echo "$RAY_VRAM_BIN"
