#!/usr/bin/env bash
# Vendors the kuberay-operator 1.7.0 chart as charts/kuberay-operator-1.7.0.tgz and writes
# Chart.lock with Helm itself, without network access to the chart repository:
#   1. the chart is packaged (`helm package`) from KubeRay's git tag v1.7.0,
#      directory helm-chart/kuberay-operator (the source of the official release);
#   2. its CRDs are gzipped into crds-upgrade/ (what the CRD upgrade hook applies);
#   3. a throw-away Helm repository configuration names the official repository URL, with a
#      cached index (`--skip-refresh`) whose chart URL points to a file server on 127.0.0.1
#      holding the package from step 1;
#   4. `helm dependency update --skip-refresh` resolves the dependency against it and writes
#      Chart.lock and charts/kuberay-operator-1.7.0.tgz exactly as it would online.
# Usage: bash charts/ray-vram/hack/vendor-kuberay-operator.sh KUBERAY_GIT_DIR [CHART_DIR]
#   KUBERAY_GIT_DIR: a clone of https://github.com/ray-project/kuberay holding tag v1.7.0
#   CHART_DIR: the chart to update (default: this chart); tests pass a copy.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SRC=${1:?usage: $0 KUBERAY_GIT_DIR [CHART_DIR]}
CHART=$(cd "${2:-$HERE/..}" && pwd)
TAG=v1.7.0
REPO_URL=https://ray-project.github.io/kuberay-helm/
HELM=${HELM:-helm}
TMP=$(mktemp -d)
SERVER_PID=
cleanup() {
  [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null
  rm -rf "$TMP"
}
trap cleanup EXIT

mkdir -p "$TMP/helm-chart"
git -C "$SRC" archive --prefix=kuberay-operator/ "$TAG:helm-chart/kuberay-operator" | tar -x -C "$TMP/helm-chart"
mkdir -p "$TMP/repo" "$TMP/cache"
"$HELM" package "$TMP/helm-chart/kuberay-operator" -d "$TMP/repo" >/dev/null

mkdir -p "$CHART/crds-upgrade"
rm -f "$CHART"/crds-upgrade/*.yaml.gz
for crd in "$TMP"/helm-chart/kuberay-operator/crds/*.yaml; do
  gzip -9 -n -c "$crd" >"$CHART/crds-upgrade/$(basename "$crd").gz"
done

PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python3 -m http.server "$PORT" --bind 127.0.0.1 --directory "$TMP/repo" >/dev/null 2>&1 &
SERVER_PID=$!
"$HELM" repo index "$TMP/repo" --url "http://127.0.0.1:$PORT" >/dev/null
cp "$TMP/repo/index.yaml" "$TMP/cache/kuberay-index.yaml"
cat >"$TMP/repositories.yaml" <<EOF
apiVersion: ""
generated: "0001-01-01T00:00:00Z"
repositories:
  - name: kuberay
    url: $REPO_URL
EOF
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$PORT/index.yaml" >/dev/null && break; sleep 0.1; done

rm -f "$CHART"/charts/kuberay-operator-*.tgz
HELM_REPOSITORY_CONFIG=$TMP/repositories.yaml HELM_REPOSITORY_CACHE=$TMP/cache \
  HELM_CACHE_HOME=$TMP/helm-cache HELM_CONFIG_HOME=$TMP/helm-config HELM_DATA_HOME=$TMP/helm-data \
  "$HELM" dependency update --skip-refresh "$CHART" >&2
ls -l "$CHART"/charts/kuberay-operator-*.tgz "$CHART/Chart.lock" >&2
