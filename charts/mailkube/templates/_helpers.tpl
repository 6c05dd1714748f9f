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

{{/* The built-in Redis runs with sentinels (redis.mode: sentinel): "true", or nothing. */}}
{{- define "mailkube.redisSentinelMode" -}}
{{- if and .Values.redis.enabled (eq .Values.redis.mode "sentinel") }}true{{ end -}}
{{- end }}

{{/* The built-in Redis pods' stable DNS names (their headless Service), one per line. */}}
{{- define "mailkube.redisPodHosts" -}}
{{- $name := include "mailkube.componentName" (dict "root" . "suffix" "redis") -}}
{{- range $i := until (int .Values.redis.sentinel.replicas) }}
{{ printf "%s-%d.%s-headless.%s.svc" $name $i $name $.Release.Namespace }}
{{- end }}
{{- end }}

{{/* The sentinels Mailkube asks (host:port, comma-separated), or nothing without Sentinel. */}}
{{- define "mailkube.redisSentinels" -}}
{{- if include "mailkube.redisSentinelMode" . -}}
{{- $hosts := list -}}
{{- range (include "mailkube.redisPodHosts" . | trim | splitList "\n") }}
{{- $hosts = append $hosts (printf "%s:26379" .) -}}
{{- end }}
{{- join "," $hosts -}}
{{- else if and (not .Values.redis.enabled) .Values.externalRedis.sentinels -}}
{{- join "," .Values.externalRedis.sentinels -}}
{{- end -}}
{{- end }}

{{/* The primary's name at the sentinels. */}}
{{- define "mailkube.redisSentinelMaster" -}}
{{- if include "mailkube.redisSentinelMode" . -}}
{{ .Values.redis.sentinel.masterName }}
{{- else -}}
{{ required "externalRedis.sentinelMaster is required with externalRedis.sentinels" .Values.externalRedis.sentinelMaster }}
{{- end -}}
{{- end }}

{{/* The key of the sentinels' own password in the Redis password's Secret, or nothing. */}}
{{- define "mailkube.redisSentinelPasswordKey" -}}
{{- if and (not .Values.redis.enabled) .Values.externalRedis.sentinels .Values.externalRedis.sentinelPasswordKey -}}
{{- if not .Values.externalRedis.existingSecret }}
{{- fail "externalRedis.existingSecret is required with externalRedis.sentinelPasswordKey" }}
{{- end -}}
{{ .Values.externalRedis.sentinelPasswordKey }}
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
{{- else if and $root.Values.externalRedis.sentinels (not $root.Values.externalRedis.url) }}
{{- /* the sentinels give the address: the URL says database 0, no TLS */}}
- name: MAILKUBE_REDIS_URL
  value: "redis://sentinel-managed/0"
{{- else }}
- name: MAILKUBE_REDIS_URL
  value: {{ required "externalRedis.url (or externalRedis.urlKey) is required when redis.enabled is false" $root.Values.externalRedis.url | quote }}
{{- end }}
{{- with include "mailkube.redisSentinels" $root }}
{{- if and (not $root.Values.redis.enabled) $root.Values.externalRedis.cluster }}
{{- fail "externalRedis.sentinels and externalRedis.cluster exclude each other" }}
{{- end }}
- name: MAILKUBE_REDIS_SENTINELS
  value: {{ . | quote }}
- name: MAILKUBE_REDIS_SENTINEL_MASTER
  value: {{ include "mailkube.redisSentinelMaster" $root | quote }}
{{- if include "mailkube.redisSentinelPasswordKey" $root }}
- name: MAILKUBE_REDIS_SENTINEL_PASSWORD_FILE
  value: {{ include "mailkube.redisSecretDir" $root }}/sentinel-password
{{- end }}
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
      {{- with include "mailkube.redisSentinelPasswordKey" $.root }}
      - key: {{ . }}
        path: sentinel-password
      {{- end }}
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
{{- $a := .Values.worker.autoscaling -}}
{{- range $role := list "local" "all" -}}
{{- $r := index $.Values.worker $role -}}
{{- if $r.enabled -}}
{{- $n = add $n (ternary $a.maxReplicas $r.replicas (and (ne $a.mode "") (has $role $a.roles))) -}}
{{- end -}}
{{- end -}}
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

{{/*
The start scripts of sentinel mode. Both ask the sentinels (any that answers) for the primary;
on a fresh install none knows one yet, and pod 0 is the primary. Redis talks to the sentinels
without a password (they have none; the NetworkPolicy keeps them to this release's pods).
*/}}
{{- define "mailkube.redisSentinelScripts" -}}
{{- $hosts := include "mailkube.redisPodHosts" . | trim | splitList "\n" }}
{{- $s := .Values.redis.sentinel }}
{{- $primary := printf "find_primary() {\n  for host in %s; do\n    found=\"$(env -u REDISCLI_AUTH redis-cli -h \"$host\" -p 26379 --raw sentinel get-master-addr-by-name %s 2>/dev/null | head -n 1)\" || true\n    if [ -n \"$found\" ]; then echo \"$found\"; return; fi\n  done\n  echo %s\n}" (join " " $hosts) $s.masterName (first $hosts) }}
start-redis.sh: |
  # Redis in sentinel mode: the primary the sentinels name, or its replica
  set -eu
  me="$(hostname).{{ include "mailkube.componentName" (dict "root" . "suffix" "redis") }}-headless.{{ .Release.Namespace }}.svc"
  {{- $primary | nindent 2 }}
  primary="$(find_primary)"
  set -- /etc/redis/redis.conf --requirepass "$REDIS_PASSWORD" --masterauth "$REDIS_PASSWORD" \
    --replica-announce-ip "$me"
  if [ "$primary" != "$me" ]; then set -- "$@" --replicaof "$primary" 6379; fi
  exec redis-server "$@"
start-sentinel.sh: |
  # a sentinel watching the primary the others name (pod 0 on a fresh install)
  set -eu
  me="$(hostname).{{ include "mailkube.componentName" (dict "root" . "suffix" "redis") }}-headless.{{ .Release.Namespace }}.svc"
  {{- $primary | nindent 2 }}
  primary="$(find_primary)"
  # the primary's name must resolve before the sentinel reads its configuration
  tries=0
  until env -u REDISCLI_AUTH redis-cli -h "$primary" -p 6379 ping >/dev/null 2>&1 || [ "$tries" -ge 60 ]; do
    tries=$((tries + 1)); sleep 1
  done
  cat > /sentinel/sentinel.conf <<EOF
  port 26379
  dir /tmp
  sentinel resolve-hostnames yes
  sentinel announce-hostnames yes
  sentinel announce-ip $me
  sentinel monitor {{ $s.masterName }} $primary 6379 {{ $s.quorum }}
  sentinel auth-pass {{ $s.masterName }} $REDIS_PASSWORD
  sentinel down-after-milliseconds {{ $s.masterName }} {{ $s.downAfterMilliseconds }}
  sentinel failover-timeout {{ $s.masterName }} {{ $s.failoverTimeout }}
  sentinel parallel-syncs {{ $s.masterName }} 1
  EOF
  exec redis-sentinel /sentinel/sentinel.conf
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
# rewrite the append-only file only once it is this big (values.yaml: the queue churns)
auto-aof-rewrite-min-size {{ .Values.redis.aofRewriteMinSize }}
appenddirname appendonlydir
# no RDB snapshots besides the AOF's own preamble
save ""
# queued mail must never be evicted: a full Redis refuses writes (the gateway answers 451)
maxmemory-policy noeviction
{{- with .Values.redis.maxmemory }}
maxmemory {{ . }}
{{- end }}
{{- end }}

{{/*
The spam defaults for domains without their own spec.spam (docs/spam.md): the same MAILKUBE_*
variables for the gateway, which applies them, and the operator, which shows them in each
MailDomain's status.spam.
*/}}
{{- define "mailkube.spamEnv" -}}
{{- with .Values.spam }}
- name: MAILKUBE_SPAM_POLICY
  value: {{ .policy | quote }}
{{- if ne (toString .rejectScore) "" }}
- name: MAILKUBE_SPAM_REJECT_SCORE
  value: {{ .rejectScore | toString | quote }}
{{- end }}
{{- if ne (toString .junkScore) "" }}
- name: MAILKUBE_SPAM_JUNK_SCORE
  value: {{ .junkScore | toString | quote }}
{{- end }}
- name: MAILKUBE_SPAM_REWRITE_SUBJECT
  value: {{ .rewriteSubject | toString | quote }}
- name: MAILKUBE_SPAM_UNAVAILABLE
  value: {{ .unavailable | quote }}
- name: MAILKUBE_GREYLISTING
  value: {{ .greylisting | toString | quote }}
{{- end }}
{{- end }}

{{/* The rspamd normal worker the gateway asks: the chart's, rspamd.url, or nothing. */}}
{{- define "mailkube.rspamdUrl" -}}
{{- if and .Values.rspamd.enabled .Values.rspamd.url }}
{{- fail "rspamd.url is for an rspamd of your own: set rspamd.enabled=false with it" }}
{{- else if .Values.rspamd.enabled -}}
{{ printf "http://%s.%s.svc:11333" (include "mailkube.componentName" (dict "root" . "suffix" "rspamd")) .Release.Namespace }}
{{- else -}}
{{ .Values.rspamd.url }}
{{- end }}
{{- end }}

{{/*
The Redis rspamd keeps its data in, as host:port: rspamd.redis.servers, else the chart's Redis,
else externalRedis.url (rspamd speaks neither TLS nor the Cluster protocol to Redis, and cannot
read a URL from a Secret).
*/}}
{{- define "mailkube.rspamdRedisServers" -}}
{{- if .Values.rspamd.redis.servers -}}
{{ .Values.rspamd.redis.servers }}
{{- else if include "mailkube.redisSentinelMode" . -}}
{{ first (include "mailkube.redisPodHosts" . | trim | splitList "\n") }}:6379
{{- else if .Values.redis.enabled -}}
{{ include "mailkube.componentName" (dict "root" . "suffix" "redis") }}:6379
{{- else -}}
{{- $hint := "set rspamd.redis.servers (host:port of a Redis rspamd can use)" }}
{{- with .Values.externalRedis }}
{{- if .sentinels }}
{{- fail (printf "rspamd is not wired to externalRedis.sentinels: %s" $hint) }}
{{- end }}
{{- if or .urlKey (not .url) }}
{{- fail (printf "rspamd cannot read externalRedis.urlKey from a Secret: %s" $hint) }}
{{- end }}
{{- if .cluster }}
{{- fail (printf "rspamd does not speak the Redis Cluster protocol: %s" $hint) }}
{{- end }}
{{- $url := urlParse .url }}
{{- if ne $url.scheme "redis" }}
{{- fail (printf "rspamd cannot reach %s://: %s" $url.scheme $hint) }}
{{- end }}
{{- if $url.userinfo }}
{{- fail (printf "externalRedis.url holds credentials rspamd cannot use: %s, and rspamd.redis.existingSecret" $hint) }}
{{- end }}
{{- $db := trimPrefix "/" $url.path | default "0" }}
{{- if eq $db (toString $.Values.rspamd.redisDb) }}
{{- fail (printf "rspamd.redisDb (%s) is the database Mailkube uses (externalRedis.url): choose another" $db) }}
{{- end }}
{{- if contains ":" $url.host }}{{ $url.host }}{{ else }}{{ $url.host }}:6379{{ end }}
{{- end }}
{{- end }}
{{- end }}

{{/* The Redis password's Secret and key for rspamd, or nothing when there is none. */}}
{{- define "mailkube.rspamdRedisSecret" -}}
{{- if .Values.rspamd.redis.servers -}}
{{ .Values.rspamd.redis.existingSecret }}
{{- else -}}
{{ include "mailkube.redisPasswordSecret" . }}
{{- end -}}
{{- end }}

{{- define "mailkube.rspamdRedisKey" -}}
{{- if .Values.rspamd.redis.servers -}}
{{ .Values.rspamd.redis.passwordKey }}
{{- else -}}
{{ include "mailkube.redisPasswordKey" . }}
{{- end -}}
{{- end }}

{{/*
rspamd's local.d overrides (the upstream image reads them from /etc/rspamd/local.d). Secrets
reach the files through rspamd's own templates: {= env.X =} is the variable RSPAMD_X.
*/}}
{{- define "mailkube.rspamdConfig" -}}
{{- $r := .Values.rspamd -}}
worker-normal.inc: |
  # the gateway scans every message here (POST /checkv2); the probes ask /ping
  bind_socket = "*:11333";
  count = {{ $r.workers }};
worker-controller.inc: |
  # learning, statistics and the web UI; reachable in the cluster, so behind a password
  # (the Secret's, in RSPAMD_CONTROLLER_PASSWORD)
  bind_socket = "*:11334";
  password = "{= env.CONTROLLER_PASSWORD =}";
worker-proxy.inc: |
  # the milter proxy: Mailkube asks the normal worker itself
  enabled = false;
redis.conf: |
  # rspamd's data (Bayes statistics, history, reputation), in a database of its own
  servers = "{{ include "mailkube.rspamdRedisServers" . }}";
  db = "{{ $r.redisDb }}";
  {{- if and (include "mailkube.redisSentinelMode" .) (not $r.redis.servers) }}
  # sentinel mode: the sentinels name the primary (servers: until one answers)
  sentinels = "{{ include "mailkube.redisSentinels" . }}";
  sentinel_watch_time = 10s;
  sentinel_masters_pattern = "^{{ .Values.redis.sentinel.masterName }}$";
  {{- end }}
  {{- if include "mailkube.rspamdRedisSecret" . }}
  password = "{= env.REDIS_PASSWORD =}";
  {{- end }}
http_headers.conf: |
  # take the gateway's SPF, DKIM and DMARC results instead of checking again
  enabled = true;
greylist.conf: |
  # Mailkube greylists (spam.greylisting, MailDomain spec.spam.greylisting)
  enabled = false;
logging.inc: |
  type = "console";
  level = "{{ $r.logLevel }}";
{{- with $r.nameservers }}
options.inc: |
  dns {
    nameserver = [{{ range $i, $ns := . }}{{ if $i }}, {{ end }}"{{ $ns }}"{{ end }}];
  }
{{- end }}
{{- $ours := list "worker-normal.inc" "worker-controller.inc" "worker-proxy.inc" "redis.conf" "http_headers.conf" "greylist.conf" "logging.inc" }}
{{- if $r.nameservers }}{{ $ours = append $ours "options.inc" }}{{ end }}
{{- range $name, $content := $r.localConfig }}
{{- if has $name $ours }}
{{- fail (printf "rspamd.localConfig: %s is written by the chart" $name) }}
{{- end }}
{{ $name }}: |
  {{- $content | nindent 2 }}
{{- end }}
{{- end }}
