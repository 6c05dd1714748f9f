{{/*
Names, labels, images, and the pieces every Mailkube pod shares (settings, Redis, probes).
*/}}

{{- define "mailkube.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mailkube.fullname" -}}
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

{{/* "<fullname>-<suffix>", at most 63 characters. dict "root" $ "suffix" "gateway" */}}
{{- define "mailkube.componentName" -}}
{{- printf "%s-%s" (include "mailkube.fullname" .root | trunc (int (sub 62 (len .suffix)))) .suffix | trimSuffix "-" }}
{{- end }}

{{- define "mailkube.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels of a component, and of one of its Deployments when the component has several
(gateway: public, internal; worker: local, remote, all).
dict "root" $ "component" "worker" ["role" "local"]
*/}}
{{- define "mailkube.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mailkube.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- with .role }}
mailkube.io/role: {{ . }}
{{- end }}
{{- end }}

{{/* Every label of a component's objects. dict "root" $ "component" "gateway" ["role" "public"] */}}
{{- define "mailkube.labels" -}}
helm.sh/chart: {{ include "mailkube.chart" .root }}
{{ include "mailkube.selectorLabels" . }}
app.kubernetes.io/part-of: mailkube
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* registry/repository:tag or @digest. dict "root" $ "image" .Values.gateway.image */}}
{{- define "mailkube.image" -}}
{{- $registry := .root.Values.global.imageRegistry | default .image.registry -}}
{{- $repository := .image.repository -}}
{{- if $registry }}{{ $repository = printf "%s/%s" $registry $repository }}{{ end -}}
{{- if .image.digest -}}
{{- printf "%s@%s" $repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repository (.image.tag | default .root.Chart.AppVersion | toString) -}}
{{- end -}}
{{- end }}

{{- define "mailkube.imagePullSecrets" -}}
{{- with .Values.global.imagePullSecrets }}
imagePullSecrets:
{{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{- define "mailkube.hostname" -}}
{{- required "mail.hostname is required: the public mail name of this installation, e.g. --set mail.hostname=mail.example.org" .Values.mail.hostname -}}
{{- end }}

{{/* Where the settings file, the Redis password and the TLS files are mounted. */}}
{{- define "mailkube.settingsDir" -}}/etc/mailkube/settings{{- end }}
{{- define "mailkube.redisSecretDir" -}}/var/run/secrets/mailkube/redis{{- end }}
{{- define "mailkube.tlsDir" -}}/etc/mailkube/tls{{- end }}
{{- define "mailkube.smartHostSecretDir" -}}/var/run/secrets/mailkube/smarthost{{- end }}
{{- define "mailkube.mailRoot" -}}/var/mail{{- end }}

{{/*
The settings file of a component: the install-wide `config` under the component's own.
dict "root" $ "config" .Values.gateway.config
*/}}
{{- define "mailkube.settingsFile" -}}
{{- $settings := merge (deepCopy (.config | default dict)) (deepCopy (.root.Values.config | default dict)) -}}
# Mailkube settings (docs/configuration.md). The chart sets the rest in MAILKUBE_*
# environment variables, which win over this file.
{{ if $settings }}{{ toYaml $settings }}{{ else }}{}{{ end }}
{{- end }}

{{/* The Redis password's Secret and key, or nothing when there is no password. */}}
{{- define "mailkube.redisPasswordSecret" -}}
{{- if .Values.redis.enabled -}}
{{ .Values.redis.existingSecret | default (include "mailkube.componentName" (dict "root" . "suffix" "redis")) }}
{{- else if .Values.externalRedis.existingSecret -}}
{{ .Values.externalRedis.existingSecret }}
{{- end -}}
{{- end }}

{{- define "mailkube.redisPasswordKey" -}}
{{- if .Values.redis.enabled }}password{{ else }}{{ .Values.externalRedis.passwordKey }}{{ end -}}
{{- end }}

{{/*
MAILKUBE_* variables every component shares: settings file, hostname, Redis, telemetry.
dict "root" $ "telemetryPort" 9100
*/}}
{{- define "mailkube.commonEnv" -}}
{{- $root := .root -}}
- name: MAILKUBE_CONFIG
  value: {{ include "mailkube.settingsDir" $root }}/mailkube.yaml
- name: MAILKUBE_HOSTNAME
  value: {{ include "mailkube.hostname" $root | quote }}
- name: MAILKUBE_TELEMETRY_LISTEN
  value: {{ printf ":%d" (int .telemetryPort) | quote }}
{{- if $root.Values.redis.enabled }}
- name: MAILKUBE_REDIS_URL
  value: {{ printf "redis://%s:6379/0" (include "mailkube.componentName" (dict "root" $root "suffix" "redis")) | quote }}
{{- else if $root.Values.externalRedis.urlKey }}
- name: MAILKUBE_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ required "externalRedis.existingSecret is required with externalRedis.urlKey" $root.Values.externalRedis.existingSecret }}
      key: {{ $root.Values.externalRedis.urlKey }}
{{- else }}
- name: MAILKUBE_REDIS_URL
  value: {{ required "externalRedis.url (or externalRedis.urlKey) is required when redis.enabled is false" $root.Values.externalRedis.url | quote }}
{{- end }}
- name: MAILKUBE_REDIS_CLUSTER
  value: {{ and (not $root.Values.redis.enabled) $root.Values.externalRedis.cluster | toString | quote }}
{{- if include "mailkube.redisPasswordSecret" $root }}
- name: MAILKUBE_REDIS_PASSWORD_FILE
  value: {{ include "mailkube.redisSecretDir" $root }}/password
{{- end }}
{{- end }}

{{/* Extra variables: the install-wide ones, then the component's. dict "root" $ "extra" list */}}
{{- define "mailkube.extraEnv" -}}
{{- with .root.Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- with .extra }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Volume mounts every component shares: the settings file, the Redis password, /tmp. */}}
{{- define "mailkube.commonVolumeMounts" -}}
- name: settings
  mountPath: {{ include "mailkube.settingsDir" . }}
  readOnly: true
{{- if include "mailkube.redisPasswordSecret" . }}
- name: redis-password
  mountPath: {{ include "mailkube.redisSecretDir" . }}
  readOnly: true
{{- end }}
- name: tmp
  mountPath: /tmp
{{- end }}

{{/* The volumes behind mailkube.commonVolumeMounts. dict "root" $ "configMap" "name" */}}
{{- define "mailkube.commonVolumes" -}}
- name: settings
  configMap:
    name: {{ .configMap }}
{{- with include "mailkube.redisPasswordSecret" .root }}
- name: redis-password
  secret:
    secretName: {{ . }}
    items:
      - key: {{ include "mailkube.redisPasswordKey" $.root }}
        path: password
{{- end }}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- end }}

{{/*
Liveness and readiness probes on the component's telemetry server.
dict "liveness" .Values.gateway.livenessProbe "readiness" .Values.gateway.readinessProbe
*/}}
{{- define "mailkube.probes" -}}
{{- with .liveness }}
{{- if .enabled }}
livenessProbe:
  httpGet:
    path: /healthz
    port: telemetry
  initialDelaySeconds: {{ .initialDelaySeconds }}
  periodSeconds: {{ .periodSeconds }}
  timeoutSeconds: {{ .timeoutSeconds }}
  failureThreshold: {{ .failureThreshold }}
{{- end }}
{{- end }}
{{- with .readiness }}
{{- if .enabled }}
readinessProbe:
  httpGet:
    path: /readyz
    port: telemetry
  initialDelaySeconds: {{ .initialDelaySeconds }}
  periodSeconds: {{ .periodSeconds }}
  timeoutSeconds: {{ .timeoutSeconds }}
  failureThreshold: {{ .failureThreshold }}
{{- end }}
{{- end }}
{{- end }}

{{/* Scheduling fields of a pod spec. dict "priorityClassName" "" "nodeSelector" ... */}}
{{- define "mailkube.scheduling" -}}
{{- with .priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The gateway's TLS Secret. */}}
{{- define "mailkube.tlsSecretName" -}}
{{- if eq .Values.gateway.tls.source "existingSecret" -}}
{{ required "gateway.tls.existingSecret is required with gateway.tls.source=existingSecret" .Values.gateway.tls.existingSecret }}
{{- else -}}
{{ include "mailkube.componentName" (dict "root" . "suffix" "gateway-tls") }}
{{- end -}}
{{- end }}

{{/* The mail volume's claim. */}}
{{- define "mailkube.mailClaimName" -}}
{{- .Values.worker.mailStorage.existingClaim | default (include "mailkube.componentName" (dict "root" . "suffix" "mail")) -}}
{{- end }}

{{/* Pods that mount the mail volume: local + all replicas. */}}
{{- define "mailkube.mailPods" -}}
{{- $n := 0 -}}
{{- if .Values.worker.local.enabled }}{{ $n = add $n .Values.worker.local.replicas }}{{ end -}}
{{- if .Values.worker.all.enabled }}{{ $n = add $n .Values.worker.all.replicas }}{{ end -}}
{{- $n -}}
{{- end }}

{{- define "mailkube.mailAccessMode" -}}
{{- if .Values.worker.mailStorage.accessMode -}}
{{ .Values.worker.mailStorage.accessMode }}
{{- else if gt (int (include "mailkube.mailPods" .)) 1 -}}
ReadWriteMany
{{- else -}}
ReadWriteOnce
{{- end -}}
{{- end }}

{{/* The namespace the operator serves (its Role lives there). */}}
{{- define "mailkube.watchNamespace" -}}
{{- .Values.operator.watchNamespace | default .Release.Namespace -}}
{{- end }}

{{/* The built-in Redis' configuration file. */}}
{{- define "mailkube.redisConfig" -}}
# Mailkube's Redis (docs/operating.md, "Redis")
bind * -::*
port 6379
protected-mode no
dir /data
# the queue's durability: every write is in the append-only file before Redis replies
appendonly yes
appendfsync {{ .Values.redis.appendfsync }}
appenddirname appendonlydir
# no RDB snapshots besides the AOF's own preamble
save ""
# queued mail must never be evicted: a full Redis refuses writes (the gateway answers 451)
maxmemory-policy noeviction
{{- with .Values.redis.maxmemory }}
maxmemory {{ . }}
{{- end }}
{{- end }}
