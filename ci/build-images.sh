#!/usr/bin/env bash
# Builds the two container images with podman on a machine that reaches no image registry:
#   1. a local base image, Debian bookworm + Python 3.11 made with debootstrap (the rootfs tarball is
#      cached under $RAY_VRAM_CACHE/images, so only the first run pays for debootstrap);
#   2. ray-vram/monitor:<appVersion>   FROM that base (BASE_IMAGE build argument);
#   3. ray-vram/ray-vram:<appVersion>  FROM that base, with VLLM=none by default here (see
#      docs/install.md "Container images": the default Dockerfile build, FROM the official Ray GPU image, installs
#      the CUDA vLLM).
# Each image is tagged localhost/ray-vram/NAME:V and docker.io/ray-vram/NAME:V, the name Kubernetes
# resolves the chart's default `ray-vram/NAME:V` to (for `podman save ... | k3s ctr images import -`).
# Prints a table of build times and sizes and writes it as JSON to $RAY_VRAM_WORK/images/build.json.
# Usage: bash ci/build-images.sh [--vllm none|full] [base] [monitor] [ray-vram]   (default: both images)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
source ci/podman.sh --env

VLLM=none
TARGETS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --vllm) VLLM=$2; shift 2 ;;
    base | monitor | ray-vram) TARGETS+=("$1"); shift ;;
    *) echo "usage: $0 [--vllm none|full] [base] [monitor] [ray-vram]" >&2; exit 2 ;;
  esac
done
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(monitor ray-vram)

VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE_PACKAGES=python3,python3-venv,python3-pip,ca-certificates
BASE_REVISION=1 # bump when make_base_tarball changes
BASE_KEY=$(printf '%s %s %s' "$SUITE" "$BASE_PACKAGES" "$BASE_REVISION" | sha256sum | cut -c1-12)
BASE_TAR=$RAY_VRAM_CACHE/images/base-$SUITE-python3-$BASE_KEY.tar
BASE_IMAGE=localhost/ray-vram/base:$SUITE-python3-$BASE_KEY
OUT=$RAY_VRAM_WORK/images
CA_BUNDLE=${RAY_VRAM_BUILD_CA_BUNDLE:-${PIP_CERT:-${SSL_CERT_FILE:-}}}
mkdir -p "$RAY_VRAM_CACHE/images" "$OUT"
log() { printf '[build-images] %s\n' "$*" >&2; }

# A minimal Debian with Python, trimmed of documentation, man pages and apt lists.
make_base_tarball() {
  local rootfs
  rootfs=$(mktemp -d "$RAY_VRAM_CACHE/images/rootfs.XXXXXX")
  log "debootstrap $SUITE with $BASE_PACKAGES (once; cached as $BASE_TAR)"
  debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$rootfs" "$MIRROR" >"$OUT/debootstrap.log" 2>&1 || {
    tail -n 20 "$OUT/debootstrap.log" >&2
    rm -rf "$rootfs"
    return 1
  }
  printf 'deb %s %s main\ndeb %s %s-updates main\n' "$MIRROR" "$SUITE" "$MIRROR" "$SUITE" >"$rootfs/etc/apt/sources.list"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* \
    "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/var/log/*.log "$rootfs"/var/cache/debconf/*-old
  find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} +
  tar --numeric-owner -C "$rootfs" -cf "$BASE_TAR.partial" .
  rm -rf "$rootfs"
  mv "$BASE_TAR.partial" "$BASE_TAR"
}

ensure_base() {
  if podman image exists "$BASE_IMAGE"; then
    return 0
  fi
  [ -f "$BASE_TAR" ] || make_base_tarball
  log "importing $BASE_TAR as $BASE_IMAGE"
  podman import -q --change 'CMD ["/bin/bash"]' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' "$BASE_TAR" "$BASE_IMAGE" >/dev/null
}

size_bytes() { podman image inspect --format '{{.Size}}' "$1"; }

# build NAME [podman build args]: writes $OUT/build-NAME.log and, on success, $OUT/build-NAME.seconds.
build() {
  local name=$1
  shift
  local image=ray-vram/$name:$VERSION start
  start=$(date +%s)
  log "building $image ($*)"
  # --network=host: pip and apt-get inside the build reach the registries without a CNI bridge.
  # The machine's CA bundle is lent to the build steps (not stored in the image): registries
  # behind a TLS-inspecting proxy are then trusted inside the build as they are outside.
  local ca=()
  [ -n "$CA_BUNDLE" ] && [ -f "$CA_BUNDLE" ] && ca=(--volume "$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro")
  podman build --network=host --pull=never --layers "${ca[@]}" -f "images/$name/Dockerfile" \
    --build-arg BASE_IMAGE="$BASE_IMAGE" "$@" -t "localhost/$image" -t "docker.io/$image" . >"$OUT/build-$name.log" 2>&1 || {
    tail -n 40 "$OUT/build-$name.log" >&2
    log "building $image failed (full log: $OUT/build-$name.log)"
    return 1
  }
  echo $(($(date +%s) - start)) >"$OUT/build-$name.seconds"
}

start=$(date +%s)
ensure_base
base_seconds=$(($(date +%s) - start))
# Both images build at once: their steps are mostly downloads and unpacking, which overlap well
# even on two cores.
pids=()
for target in "${TARGETS[@]}"; do
  rm -f "$OUT/build-$target.seconds"
  case "$target" in
    base) continue ;;
    monitor) build monitor & ;;
    ray-vram) build ray-vram --build-arg VLLM="$VLLM" & ;;
  esac
  pids+=($!)
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
[ "$failed" = 0 ] || exit 1

rows=("$BASE_IMAGE|$BASE_IMAGE|$base_seconds")
for target in "${TARGETS[@]}"; do
  [ "$target" = base ] && continue
  rows+=("ray-vram/$target:$VERSION|localhost/ray-vram/$target:$VERSION|$(cat "$OUT/build-$target.seconds")")
done
json='{"vllm": "'$VLLM'", "images": ['
printf '%-56s %9s %8s\n' image size_MB build_s | tee "$OUT/build.txt"
for row in "${rows[@]}"; do
  IFS='|' read -r name ref took <<<"$row"
  bytes=$(size_bytes "$ref")
  printf '%-56s %9s %8s\n' "$name" "$((bytes / 1000000))" "$took" | tee -a "$OUT/build.txt"
  json+='{"image": "'$name'", "size_bytes": '$bytes', "build_seconds": '$took'},'
done
printf '%s]}\n' "${json%,}" >"$OUT/build.json"
log "done in $(($(date +%s) - start))s (table: $OUT/build.txt, JSON: $OUT/build.json)"
