#!/usr/bin/env bash
# A real Kubernetes API server (kube-apiserver 1.20.2 + etcd) on 127.0.0.1 for the chart tests.
# The only Kubernetes server source reachable from here is Debian's `kubernetes` source package
# (1.20.2), so it is built from that once (~8 min, Go from Debian) and cached under
# $RAY_VRAM_CACHE/kube-apiserver-1.20.2/. No kubelet or controllers run: objects are stored and
# validated, never scheduled.
#
# Usage: bash ci/kube-apiserver.sh build|start|stop|status
#   build   build (or reuse) the cached binary
#   start   build if needed, start etcd + apiserver unless already serving; prints the
#           kubeconfig path as the last line of stdout (idempotent, safe to call concurrently)
#   stop    stop what `start` started
#   status  exit 0 and print the kubeconfig path when serving, exit 1 otherwise
# Ports (override for parallel checkouts): KUBE_APISERVER_PORT (16443), KUBE_ETCD_PORT (12379).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
source "$ROOT/ci/env.sh"
VERSION=1.20.2
DEB_VERSION=1.20.5+really1.20.2-1.1+deb12u1
CACHE=$RAY_VRAM_CACHE/kube-apiserver-$VERSION
BIN=$CACHE/bin/kube-apiserver
RUN=$RAY_VRAM_WORK/kube-apiserver
PORT=${KUBE_APISERVER_PORT:-16443}
ETCD_PORT=${KUBE_ETCD_PORT:-12379}
ETCD_PEER_PORT=$((ETCD_PORT + 1))
log() { printf '[kube-apiserver] %s\n' "$*" >&2; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_install() {
  local pkgs=(golang-go golang-github-modern-go-reflect2-dev etcd-server openssl dpkg-dev make rsync curl)
  local missing=()
  for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing ${missing[*]} from Debian"
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
    as_root apt-get update -q >/dev/null
    as_root apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  }
}

build() {
  apt_install
  [ -x "$BIN" ] && return 0
  local start; start=$(date +%s)
  local W=$CACHE/build
  log "building kube-apiserver $VERSION from Debian's kubernetes source package (several minutes; log: $W/build.log)"
  rm -rf "$W"; mkdir -p "$W/apt/lists/partial" "$W/apt/cache/archives/partial" "$W/src"
  # A private apt configuration that knows the deb-src line; the system's sources stay untouched.
  echo 'deb-src http://deb.debian.org/debian bookworm main' >"$W/apt/sources.list"
  local A=(-o "Dir::Etc::SourceList=$W/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
    -o "Dir::State::Lists=$W/apt/lists" -o "Dir::Cache=$W/apt/cache")
  apt-get "${A[@]}" update >/dev/null
  (cd "$W/src" && apt-get "${A[@]}" source --download-only "kubernetes=$DEB_VERSION" >/dev/null &&
    dpkg-source -x "kubernetes_$DEB_VERSION.dsc" k8s >/dev/null)
  local K=$W/src/k8s
  # The vendored reflect2 does not build with Debian's Go 1.19; Debian's reflect2 1.0.2 does.
  rm -rf "$K/vendor/github.com/modern-go/reflect2"
  mkdir -p "$K/vendor/github.com/modern-go/reflect2"
  cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.go /usr/share/gocode/src/github.com/modern-go/reflect2/*.s \
    "$K/vendor/github.com/modern-go/reflect2/"
  rm -f "$K"/vendor/github.com/modern-go/reflect2/*_test.go
  mkdir -p "$K/.go/src/k8s.io" && ln -sfn ../../.. "$K/.go/src/k8s.io/kubernetes"
  if ! (cd "$K" && env GOPATH="$K/.go" CGO_ENABLED=0 GOPROXY=off GOCACHE="$W/gocache" \
    HOME="$W/home" make WHAT=cmd/kube-apiserver >"$W/build.log" 2>&1); then
    log "build failed; last lines of $W/build.log:"; tail -n 30 "$W/build.log" >&2; exit 1
  fi
  mkdir -p "$CACHE/bin"
  cp "$K/_output/bin/kube-apiserver" "$BIN.tmp" && mv "$BIN.tmp" "$BIN"
  rm -rf "$W/src" "$W/gocache"   # ~2 GB of sources and objects; the binary is all we keep
  log "built $("$BIN" --version) in $(( $(date +%s) - start ))s"
}

token() { cut -d, -f1 "$RUN/tokens.csv" 2>/dev/null; }

serving() {
  [ -f "$RUN/kubeconfig" ] && [ -f "$RUN/apiserver.pid" ] && kill -0 "$(cat "$RUN/apiserver.pid")" 2>/dev/null &&
    curl -ksf -m 3 -H "Authorization: Bearer $(token)" "https://127.0.0.1:$PORT/readyz" >/dev/null 2>&1
}

stop_pid() {
  local f=$1 pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

stop() {
  stop_pid "$RUN/apiserver.pid"
  stop_pid "$RUN/etcd.pid"
  log "stopped"
}

start() {
  if serving; then echo "$RUN/kubeconfig"; return 0; fi
  build
  # Leftovers of an earlier run that is no longer serving: start clean.
  stop_pid "$RUN/apiserver.pid"; stop_pid "$RUN/etcd.pid"
  rm -rf "$RUN/etcd-data"; mkdir -p "$RUN/certs"
  cd "$RUN"
  [ -f sa.key ] || { openssl genrsa -out sa.key 2048 2>/dev/null; openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null; }
  local tok; tok=$(openssl rand -hex 16)
  echo "$tok,admin,admin,system:masters" >tokens.csv
  setsid etcd --name ray-vram-test --data-dir etcd-data \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "ray-vram-test=http://127.0.0.1:$ETCD_PEER_PORT" >etcd.log 2>&1 </dev/null 9>&- &
  echo $! >etcd.pid
  setsid "$BIN" --etcd-servers="http://127.0.0.1:$ETCD_PORT" --bind-address=127.0.0.1 --advertise-address=127.0.0.1 \
    --endpoint-reconciler-type=none --secure-port="$PORT" --insecure-port=0 --cert-dir=certs \
    --token-auth-file=tokens.csv --authorization-mode=RBAC \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file=sa.pub --service-account-signing-key-file=sa.key \
    --service-cluster-ip-range=10.96.0.0/16 >apiserver.log 2>&1 </dev/null 9>&- &
  echo $! >apiserver.pid
  cat >kubeconfig.tmp <<KC
apiVersion: v1
kind: Config
clusters: [{name: ray-vram-test, cluster: {server: "https://127.0.0.1:$PORT", insecure-skip-tls-verify: true}}]
users: [{name: admin, user: {token: "$tok"}}]
contexts: [{name: ray-vram-test, context: {cluster: ray-vram-test, user: admin, namespace: default}}]
current-context: ray-vram-test
KC
  mv kubeconfig.tmp kubeconfig
  for i in $(seq 120); do
    if serving; then log "serving on https://127.0.0.1:$PORT after ${i}s"; echo "$RUN/kubeconfig"; return 0; fi
    sleep 1
  done
  log "not ready after 120s; last lines of $RUN/apiserver.log:"; tail -n 20 "$RUN/apiserver.log" >&2
  stop; exit 1
}

cmd=${1:-start}
mkdir -p "$RUN"
case $cmd in
  build) exec 9>"$RAY_VRAM_CACHE/.kube-apiserver-build.lock"; flock 9; build; echo "$BIN" ;;
  start)
    if serving; then echo "$RUN/kubeconfig"; exit 0; fi
    exec 9>"$RAY_VRAM_CACHE/.kube-apiserver-build.lock"; flock 9
    start ;;
  stop) stop ;;
  status) if serving; then echo "$RUN/kubeconfig"; else exit 1; fi ;;
  *) echo "usage: $0 build|start|stop|status" >&2; exit 2 ;;
esac
