{{/*
Names
*/}}
{{- define "dgserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "dgserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* "<fullname>-<suffix>", kept to 63 characters. Call with (list $ "suffix"). */}}
{{- define "dgserve.componentName" -}}
{{- $root := index . 0 }}
{{- printf "%s-%s" (include "dgserve.fullname" $root) (index . 1) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Worker Deployment name for one model. Call with (list $ $modelName). */}}
{{- define "dgserve.workerName" -}}
{{- include "dgserve.componentName" (list (index . 0) (printf "worker-%s" (index . 1))) }}
{{- end }}

{{- define "dgserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels
*/}}
{{- define "dgserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dgserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "dgserve.labels" -}}
helm.sh/chart: {{ include "dgserve.chart" . }}
{{ include "dgserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: dgserve
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Images: repository:tag, the tag defaulting to the chart's appVersion.
Call with (list $ .Values.gateway.image).
*/}}
{{- define "dgserve.image" -}}
{{- $root := index . 0 }}
{{- $img := index . 1 }}
{{- printf "%s:%s" $img.repository (toString (default $root.Chart.AppVersion $img.tag)) }}
{{- end }}

{{- define "dgserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "dgserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Models
*/}}
{{/* DG_MODELS: "name=path,name=path" */}}
{{- define "dgserve.modelsEnv" -}}
{{- $pairs := list }}
{{- range .Values.models }}
{{- $pairs = append $pairs (printf "%s=%s" .name .path) }}
{{- end }}
{{- join "," $pairs }}
{{- end }}

{{- define "dgserve.defaultModel" -}}
{{- if .Values.defaultModel }}{{ .Values.defaultModel }}{{ else }}{{ (first .Values.models).name }}{{ end }}
{{- end }}

{{/*
Worker settings of one model: `worker` deep-merged with the model's overrides, as YAML.
Call with (list $ $model); use with fromYaml.
*/}}
{{- define "dgserve.workerValues" -}}
{{- $root := index . 0 }}
{{- $model := index . 1 }}
{{- $merged := mergeOverwrite (deepCopy $root.Values.worker) (deepCopy (default dict $model.worker)) }}
{{- toYaml $merged }}
{{- end }}

{{/* DG_DEVICE of a merged worker: explicit, else cuda with GPUs, else cpu. */}}
{{- define "dgserve.workerDevice" -}}
{{- if .device }}{{ .device }}{{ else if gt (int .gpu.count) 0 }}cuda{{ else }}cpu{{ end }}
{{- end }}

{{/* Termination grace of a merged worker: explicit (checked), else preStop + drain + 30. */}}
{{- define "dgserve.workerGrace" -}}
{{- $floor := add (int .preStopSleepSeconds) (int .drainTimeoutSeconds) }}
{{- if kindIs "invalid" .terminationGracePeriodSeconds }}
{{- add $floor 30 }}
{{- else if le (int .terminationGracePeriodSeconds) $floor }}
{{- fail (printf "worker.terminationGracePeriodSeconds (%v) must exceed preStopSleepSeconds + drainTimeoutSeconds (%v)" .terminationGracePeriodSeconds $floor) }}
{{- else }}
{{- int .terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/*
Secrets
*/}}
{{- define "dgserve.secretName" -}}
{{- include "dgserve.componentName" (list . "secrets") }}
{{- end }}

{{/* True ("true") when the chart must create its own Secret. */}}
{{- define "dgserve.needsSecret" -}}
{{- $v := .Values }}
{{- if or (and $v.apiKeys.keys (not $v.apiKeys.existingSecret)) (and $v.huggingface.token (not $v.huggingface.existingSecret)) (and (not $v.redis.enabled) $v.externalRedis.url (not $v.externalRedis.existingSecret)) (and $v.redis.enabled $v.redis.auth.enabled (not $v.redis.auth.existingSecret)) }}true{{ end }}
{{- end }}

{{/* env entries: DG_API_KEYS and HF_TOKEN from Secrets, when configured. */}}
{{- define "dgserve.apiKeysEnv" -}}
{{- if .Values.apiKeys.existingSecret }}
- name: DG_API_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ .Values.apiKeys.existingSecret }}
      key: {{ .Values.apiKeys.existingSecretKey }}
{{- else if .Values.apiKeys.keys }}
- name: DG_API_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ include "dgserve.secretName" . }}
      key: api-keys
{{- end }}
{{- end }}

{{- define "dgserve.hfTokenEnv" -}}
{{- if .Values.huggingface.existingSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.huggingface.existingSecret }}
      key: {{ .Values.huggingface.existingSecretKey }}
{{- else if .Values.huggingface.token }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "dgserve.secretName" . }}
      key: hf-token
{{- end }}
{{- end }}

{{/*
Redis
*/}}
{{- define "dgserve.redisServiceName" -}}
{{- include "dgserve.componentName" (list . "redis") }}
{{- end }}

{{/* Secret and key holding the bundled Redis' password. */}}
{{- define "dgserve.redisPasswordSecretName" -}}
{{- default (include "dgserve.secretName" .) .Values.redis.auth.existingSecret }}
{{- end }}
{{- define "dgserve.redisPasswordSecretKey" -}}
{{- if .Values.redis.auth.existingSecret }}{{ .Values.redis.auth.existingSecretKey }}{{ else }}redis-password{{ end }}
{{- end }}

{{/* env entries giving REDIS_URL to gateway and workers. */}}
{{- define "dgserve.redisEnv" -}}
{{- if .Values.redis.enabled }}
{{- $hostPort := printf "%s:%v" (include "dgserve.redisServiceName" .) .Values.redis.port }}
{{- if .Values.redis.auth.enabled }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "dgserve.redisPasswordSecretName" . }}
      key: {{ include "dgserve.redisPasswordSecretKey" . }}
- name: REDIS_URL
  value: "redis://:$(REDIS_PASSWORD)@{{ $hostPort }}/0"
{{- else }}
- name: REDIS_URL
  value: "redis://{{ $hostPort }}/0"
{{- end }}
{{- else if .Values.externalRedis.existingSecret }}
- name: REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.externalRedis.existingSecret }}
      key: {{ .Values.externalRedis.existingSecretKey }}
{{- else }}
- name: REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "dgserve.secretName" . }}
      key: redis-url
{{- end }}
{{- end }}

{{/*
Checks of the values as a whole; rendered (as nothing) by every install.
*/}}
{{- define "dgserve.validateValues" -}}
{{- if not .Values.models }}
{{- fail "models: list at least one model (name and path)" }}
{{- end }}
{{- $names := list }}
{{- range .Values.models }}
{{- if not .name }}{{ fail "models[]: every model needs a name" }}{{ end }}
{{- if not .path }}{{ fail (printf "models[%s]: path is required (Hugging Face id or directory)" .name) }}{{ end }}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" .name) }}
{{- fail (printf "models[].name %q must be a DNS label: lowercase letters, digits and '-'" .name) }}
{{- end }}
{{- if has .name $names }}{{ fail (printf "models[].name %q is listed twice" .name) }}{{ end }}
{{- $names = append $names .name }}
{{- end }}
{{- if and .Values.defaultModel (not (has .Values.defaultModel $names)) }}
{{- fail (printf "defaultModel %q is not one of models[].name %v" .Values.defaultModel $names) }}
{{- end }}
{{- if and .Values.redis.enabled (or .Values.externalRedis.url .Values.externalRedis.existingSecret) }}
{{- fail "redis.enabled is true and externalRedis is set: choose one (set redis.enabled=false to use externalRedis)" }}
{{- end }}
{{- if and (not .Values.redis.enabled) (not (or .Values.externalRedis.url .Values.externalRedis.existingSecret)) }}
{{- fail "redis.enabled is false: set externalRedis.url or externalRedis.existingSecret" }}
{{- end }}
{{- if and .Values.redis.enabled .Values.redis.auth.enabled (not (or .Values.redis.auth.password .Values.redis.auth.existingSecret)) }}
{{- fail "redis.auth.enabled: set redis.auth.password or redis.auth.existingSecret" }}
{{- end }}
{{- end }}
