{{/* Names, labels and image references shared by every template. */}}

{{- define "ray-vram.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ray-vram.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Selector labels of one component (component name as the argument's .component). */}}
{{- define "ray-vram.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ray-vram.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "ray-vram.labels" -}}
{{ include "ray-vram.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: ray-vram
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "ray-vram.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "ray-vram.monitorImage" -}}
{{- printf "%s:%s" .Values.monitor.image.repository (default .Chart.AppVersion .Values.monitor.image.tag) -}}
{{- end -}}

{{- define "ray-vram.rayClusterName" -}}
{{- include "ray-vram.fullname" . -}}
{{- end -}}

{{/* The Service KubeRay creates for the head: <cluster>-head-svc. */}}
{{- define "ray-vram.headService" -}}
{{- printf "%s-head-svc" (include "ray-vram.rayClusterName" .) -}}
{{- end -}}

{{/* The Secret with `controller-token` and `internal-key`: the operator's, or the one the hook Job generates. */}}
{{- define "ray-vram.authSecret" -}}
{{- default (printf "%s-auth" (include "ray-vram.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{/* The endpoint's API key Secret (key `api-key`): the operator's, the chart's from `apiKey.value`, or the auth Secret. */}}
{{- define "ray-vram.apiKeySecret" -}}
{{- if .Values.apiKey.existingSecret -}}
{{- .Values.apiKey.existingSecret -}}
{{- else if .Values.apiKey.value -}}
{{- printf "%s-api-key" (include "ray-vram.fullname" .) -}}
{{- else -}}
{{- include "ray-vram.authSecret" . -}}
{{- end -}}
{{- end -}}

{{/* Whether the API key is a random one the hook Job generates into the auth Secret. */}}
{{- define "ray-vram.generatedApiKey" -}}
{{- if and .Values.apiKey.create (not .Values.apiKey.existingSecret) (not .Values.apiKey.value) }}true{{ end -}}
{{- end -}}

{{/* Host names of the controller's Service, which clients in the cluster use (its Host header check). */}}
{{- define "ray-vram.controllerHosts" -}}
{{- $svc := printf "%s-controller" (include "ray-vram.fullname" .) -}}
{{- $ns := .Release.Namespace -}}
{{- $names := list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns) -}}
{{- join "," (concat $names .Values.auth.controllerHosts) -}}
{{- end -}}

{{- define "ray-vram.apiKeyEnabled" -}}
{{- if or .Values.apiKey.create .Values.apiKey.existingSecret }}true{{ end -}}
{{- end -}}

{{/* The serving configuration file (RayVRAMConfig): exactly models, placement and serving. */}}
{{- define "ray-vram.config" -}}
{{- $cfg := dict "models" .Values.models "placement" .Values.placement "serving" .Values.serving -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* Whether to render Prometheus Operator objects. */}}
{{- define "ray-vram.prometheusOperator" -}}
{{- $mode := .Values.monitoring.prometheusOperator -}}
{{- if or (eq $mode "always") (and (eq $mode "auto") (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1")) }}true{{ end -}}
{{- end -}}

{{/* policy/v1 PodDisruptionBudget from Kubernetes 1.21; policy/v1beta1 before (removed in 1.25). */}}
{{- define "ray-vram.pdbApiVersion" -}}
{{- if .Capabilities.APIVersions.Has "policy/v1" -}}policy/v1{{- else -}}policy/v1beta1{{- end -}}
{{- end -}}

{{/* Environment of every Ray container: auth, API key, internal key, HF token, Serve defaults. */}}
{{- define "ray-vram.rayEnv" -}}
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
{{- if .Values.rayCluster.tokenAuth }}
- name: RAY_AUTH_MODE
  value: token
{{- end }}
{{- if include "ray-vram.apiKeyEnabled" . }}
- name: {{ default "RAY_VRAM_API_KEY" .Values.serving.api_key_env }}
  valueFrom:
    secretKeyRef:
      name: {{ include "ray-vram.apiKeySecret" . }}
      key: api-key
{{- end }}
# The cluster's key between routers and replicas (from the auth Secret, never in Ray's runtime env).
- name: RAY_VRAM_INTERNAL_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "ray-vram.authSecret" . }}
      key: internal-key
{{- with .Values.hfToken.existingSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.hfToken.key }}
{{- end }}
{{- end -}}

{{/* CUDA environment of GPU containers. */}}
{{- define "ray-vram.gpuEnv" -}}
{{- range $name, $value := .Values.gpu.cudaEnv }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- if eq .Values.gpu.mode "hostMounts" }}
- name: LD_LIBRARY_PATH
  value: {{ .Values.gpu.hostMounts.ldLibraryPath | quote }}
- name: NVIDIA_VISIBLE_DEVICES
  value: all
{{- end }}
{{- if eq .Values.vllm.source "initContainer" }}
- name: PYTHONPATH
  value: /opt/vllm
{{- end }}
{{- end -}}

{{/* The images run as uid 1000, gid 100 (`ray` in the official Ray images). */}}
{{- define "ray-vram.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 100
fsGroup: 100
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "ray-vram.containerSecurityContext" -}}
allowPrivilegeEscalation: false
capabilities:
  drop: [ALL]
{{- end -}}

{{/* Model names (model_id and router_name) must be unique: JSON schema cannot say so. */}}
{{- define "ray-vram.checkModels" -}}
{{- $seen := dict -}}
{{- range $i, $m := .Values.models -}}
{{- range $name := compact (list $m.model_id ($m.router_name | default "")) -}}
{{- if hasKey $seen $name -}}
{{- fail (printf "models[%d]: model name %q is already used by models[%s]; model_id and router_name must be unique" $i $name (get $seen $name)) -}}
{{- end -}}
{{- $_ := set $seen $name (toString $i) -}}
{{- end -}}
{{- end -}}
{{- end -}}
