#!/usr/bin/env bash
# Runs podman the way it works on this kind of machine (Debian 12, cgroup v1/hybrid, no
# CAP_SYS_RESOURCE): runc instead of crun (crun fails in hybrid cgroup mode), cgroupfs, explicit
# ulimits (the defaults fail without CAP_SYS_RESOURCE), and image storage under $RAY_VRAM_CACHE so
# that built layers survive between runs. Installs podman with apt-get on first use.
# Usage: bash ci/podman.sh PODMAN-ARGS...      (e.g. bash ci/podman.sh images)
#        source ci/podman.sh --env             (exports the podman configuration only)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$ROOT/ci/env.sh"

CONF_DIR=$RAY_VRAM_CACHE/podman
log() { printf '[podman] %s\n' "$*" >&2; }

install_podman() {
  command -v podman >/dev/null && command -v runc >/dev/null && return 0
  log "installing podman, runc and debootstrap with apt-get (once)"
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    podman buildah runc conmon containernetworking-plugins catatonit fuse-overlayfs uidmap \
    slirp4netns golang-github-containers-common debootstrap >/dev/null
}

write_config() {
  mkdir -p "$CONF_DIR/storage" "$CONF_DIR/run" "$CONF_DIR/tmp"
  # Containers may not raise a limit above this shell's hard limit (no CAP_SYS_RESOURCE): take it as is.
  local nofile nproc
  nofile=$(ulimit -Hn)
  nproc=$(ulimit -Hu)
  [ "$nofile" = unlimited ] && nofile=1048576
  # nproc above 16384 is refused here even under the hard limit (runc: "error setting rlimit type 6").
  { [ "$nproc" = unlimited ] || [ "$nproc" -gt 16384 ]; } && nproc=16384
  cat >"$CONF_DIR/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
  printf '[storage]\ndriver = "overlay"\ngraphroot = "%s/storage"\nrunroot = "%s/run"\n' \
    "$CONF_DIR" "$CONF_DIR" >"$CONF_DIR/storage.conf"
}

install_podman
write_config
export CONTAINERS_CONF=$CONF_DIR/containers.conf CONTAINERS_STORAGE_CONF=$CONF_DIR/storage.conf
# Layers of large images go through TMPDIR: keep it beside the storage, not in the checkout.
export TMPDIR=$CONF_DIR/tmp
if [ "${1:-}" = "--env" ]; then
  return 0 2>/dev/null || exit 0
fi
exec podman "$@"
