{{/* Chart name, for app.kubernetes.io/name. */}}
{{- define "presence.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Base name of every object: fullnameOverride, else the release name when it contains
"presence", else "<release>-presence". At most 40 characters, so that "<base>-shard" stays a
valid StatefulSet name (its pods' controller-revision-hash label must fit in 63).
*/}}
{{- define "presence.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else if contains "presence" .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-presence" .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "presence.gatewayName" -}}{{ include "presence.fullname" . }}-gateway{{- end -}}
{{- define "presence.shardName" -}}{{ include "presence.fullname" . }}-shard{{- end -}}
{{- define "presence.redisName" -}}{{ include "presence.fullname" . }}-redis{{- end -}}
{{- define "presence.configName" -}}{{ include "presence.fullname" . }}-config{{- end -}}
{{- define "presence.grpcTlsName" -}}{{ include "presence.fullname" . }}-grpc-tls{{- end -}}

{{/* The Secret with the nodes' gRPC certificate: grpcTls.existingSecret or cert-manager's. */}}
{{- define "presence.grpcTlsSecret" -}}
{{- default (include "presence.grpcTlsName" .) .Values.grpcTls.existingSecret -}}
{{- end -}}

{{- define "presence.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "presence.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "presence.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object. */}}
{{- define "presence.labels" -}}
helm.sh/chart: {{ include "presence.chart" . }}
{{ include "presence.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: presence-service
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "presence.selectorLabels" -}}
app.kubernetes.io/name: {{ include "presence.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels and selector labels of one component: include with (list $ "gateway"). */}}
{{- define "presence.componentLabels" -}}
{{ include "presence.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}
{{- define "presence.componentSelector" -}}
{{ include "presence.selectorLabels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "presence.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The Nacos service name of the shards. */}}
{{- define "presence.nacosService" -}}
{{- default (include "presence.shardName" .) .Values.discovery.nacos.service -}}
{{- end -}}

{{/* Seed URLs of the Redis Cluster, comma-separated (the password is PRESENCE_REDIS_PASSWORD). */}}
{{- define "presence.redisUrl" -}}
{{- $urls := list -}}
{{- if eq .Values.redis.mode "bundled" -}}
{{- $name := include "presence.redisName" . -}}
{{- range $i := until (int .Values.redis.bundled.nodes) -}}
{{- $urls = append $urls (printf "redis://%s-%d.%s:6379" $name $i $name) -}}
{{- end -}}
{{- else if eq .Values.redis.mode "external" -}}
{{- $urls = .Values.redis.urls -}}
{{- end -}}
{{- join "," $urls -}}
{{- end -}}

{{/* The shards' Redis settings from Secrets and values: password, user, TLS files. */}}
{{- define "presence.redisEnv" -}}
{{- $r := .Values.redis -}}
- name: PRESENCE_REDIS_URL
  value: {{ include "presence.redisUrl" . | quote }}
{{- if $r.existingSecret }}
- name: PRESENCE_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $r.existingSecret }}
      key: {{ $r.existingSecretPasswordKey }}
{{- end }}
{{- if $r.username }}
- name: PRESENCE_REDIS_USERNAME
  value: {{ $r.username | quote }}
{{- end }}
{{- if $r.tls.existingSecret }}
{{- if $r.tls.ca }}
- name: PRESENCE_REDIS_TLS_CA
  value: /etc/presence/redis-tls/ca.crt
{{- end }}
{{- if $r.tls.clientCert }}
- name: PRESENCE_REDIS_TLS_CERT
  value: /etc/presence/redis-tls/tls.crt
- name: PRESENCE_REDIS_TLS_KEY
  value: /etc/presence/redis-tls/tls.key
{{- end }}
{{- end }}
{{- end -}}

{{/* The Redis TLS Secret's volume and mount (redis.tls.existingSecret), for the shards. */}}
{{- define "presence.redisTlsVolume" -}}
- name: redis-tls
  secret:
    secretName: {{ .Values.redis.tls.existingSecret }}
    defaultMode: 288 # 0440: the pods' group (fsGroup) may read
{{- end -}}
{{- define "presence.redisTlsMount" -}}
- name: redis-tls
  mountPath: /etc/presence/redis-tls
  readOnly: true
{{- end -}}

{{/* The bundled Redis' password for redis-server and redis-cli, when redis.existingSecret is set. */}}
{{- define "presence.redisAuthEnv" -}}
{{- if .Values.redis.existingSecret -}}
- name: REDISCLI_AUTH
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret }}
      key: {{ .Values.redis.existingSecretPasswordKey }}
{{- end -}}
{{- end -}}

{{/* terminationGracePeriodSeconds for a role: preStop sleep + drain + margin. */}}
{{- define "presence.gracePeriod" -}}
{{- $root := index . 0 -}}
{{- $preStop := int (index . 1) -}}
{{- add $preStop (int $root.Values.config.drainTimeoutSeconds) (int $root.Values.config.graceMarginSeconds) -}}
{{- end -}}

{{/* Cross-field checks the JSON schema cannot express. */}}
{{- define "presence.validate" -}}
{{- $v := .Values -}}
{{- if and (eq $v.redis.mode "external") (empty $v.redis.urls) -}}
{{- fail "redis.mode=external needs redis.urls (e.g. [redis://redis-0.redis:6379])" -}}
{{- end -}}
{{- if and $v.redis.existingSecret (eq $v.redis.mode "memory") -}}
{{- fail "redis.existingSecret is only used with redis.mode=external or bundled" -}}
{{- end -}}
{{- if and $v.redis.username (ne $v.redis.mode "external") -}}
{{- fail "redis.username is only used with redis.mode=external" -}}
{{- end -}}
{{- if and $v.redis.username (not $v.redis.existingSecret) -}}
{{- fail "redis.username needs its password in redis.existingSecret" -}}
{{- end -}}
{{- $tls := 0 -}}
{{- range $v.redis.urls -}}{{- if hasPrefix "rediss://" . -}}{{- $tls = add1 $tls -}}{{- end -}}{{- end -}}
{{- if and (gt (int $tls) 0) (lt (int $tls) (len $v.redis.urls)) -}}
{{- fail "redis.urls: all rediss:// (TLS) or none" -}}
{{- end -}}
{{- if and $v.redis.tls.existingSecret (or (ne $v.redis.mode "external") (eq (int $tls) 0)) -}}
{{- fail "redis.tls.existingSecret needs redis.mode=external with rediss:// urls" -}}
{{- end -}}
{{- if and $v.redis.tls.existingSecret (not (or $v.redis.tls.ca $v.redis.tls.clientCert)) -}}
{{- fail "redis.tls.existingSecret: set redis.tls.ca or redis.tls.clientCert (or drop the Secret)" -}}
{{- end -}}
{{- if eq $v.redis.mode "bundled" -}}
{{- $min := mul 3 (add1 (int $v.redis.bundled.replicasPerMaster)) -}}
{{- if lt (int $v.redis.bundled.nodes) (int $min) -}}
{{- fail (printf "redis.bundled.nodes must be at least 3 x (1 + replicasPerMaster) = %d" (int $min)) -}}
{{- end -}}
{{- if gt (int $v.redis.minReplicas) (int $v.redis.bundled.replicasPerMaster) -}}
{{- fail "redis.minReplicas must not exceed redis.bundled.replicasPerMaster (writes would wait for replicas that do not exist)" -}}
{{- end -}}
{{- end -}}
{{- if and (eq $v.discovery.mode "nacos") (not $v.discovery.nacos.address) -}}
{{- fail "discovery.mode=nacos needs discovery.nacos.address (host:port)" -}}
{{- end -}}
{{- if and $v.gateway.autoscaling.enabled (gt (int $v.gateway.autoscaling.minReplicas) (int $v.gateway.autoscaling.maxReplicas)) -}}
{{- fail "gateway.autoscaling.minReplicas must not exceed maxReplicas" -}}
{{- end -}}
{{- if and $v.gateway.autoscaling.enabled (eq (int $v.gateway.autoscaling.targetCPUUtilizationPercentage) 0) (not $v.gateway.autoscaling.wsConnections.enabled) -}}
{{- fail "gateway.autoscaling needs CPU (targetCPUUtilizationPercentage > 0) or wsConnections" -}}
{{- end -}}
{{- if eq $v.auth.mode "jwt" -}}
{{- if not (or $v.auth.jwksUrl $v.auth.existingSecret) -}}
{{- fail "auth.mode=jwt (the default) needs a key source: set auth.jwksUrl (the identity provider's JWKS URL) or auth.existingSecret (a Secret with an HS256 secret); to run without authentication set auth.mode=none and auth.allowAnonymous=true" -}}
{{- end -}}
{{- else if not $v.auth.allowAnonymous -}}
{{- fail "auth is off: set auth.allowAnonymous=true to run without authentication (auth.mode=none lets any client act for any user)" -}}
{{- end -}}
{{- if $v.grpcTls.enabled -}}
{{- if and $v.grpcTls.existingSecret $v.grpcTls.certManager.enabled -}}
{{- fail "grpcTls: set either grpcTls.existingSecret or grpcTls.certManager.enabled, not both" -}}
{{- end -}}
{{- if not (or $v.grpcTls.existingSecret $v.grpcTls.certManager.enabled) -}}
{{- fail "grpcTls.enabled needs a certificate source: grpcTls.existingSecret (a kubernetes.io/tls Secret with tls.crt, tls.key, ca.crt) or grpcTls.certManager.enabled=true with grpcTls.certManager.issuerRef" -}}
{{- end -}}
{{- if and $v.grpcTls.certManager.enabled (not $v.grpcTls.certManager.issuerRef.name) -}}
{{- fail "grpcTls.certManager.enabled needs grpcTls.certManager.issuerRef.name (an Issuer or ClusterIssuer that fills ca.crt, e.g. a CA issuer)" -}}
{{- end -}}
{{- end -}}
{{- if or (gt (int $v.gateway.preStopSleepSeconds) 0) (gt (int $v.shard.preStopSleepSeconds) 0) -}}
{{- if semverCompare "<1.30.0-0" .Capabilities.KubeVersion.Version -}}
{{- fail "preStop sleep hooks need Kubernetes 1.30+; set gateway.preStopSleepSeconds and shard.preStopSleepSeconds to 0" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Security contexts, probes and env shared by both roles. */}}
{{- define "presence.probes" -}}
readinessProbe:
  httpGet:
    path: /readyz
    port: http
  periodSeconds: {{ .Values.probes.readiness.periodSeconds }}
  timeoutSeconds: {{ .Values.probes.readiness.timeoutSeconds }}
  failureThreshold: {{ .Values.probes.readiness.failureThreshold }}
livenessProbe:
  httpGet:
    path: /livez
    port: http
  periodSeconds: {{ .Values.probes.liveness.periodSeconds }}
  timeoutSeconds: {{ .Values.probes.liveness.timeoutSeconds }}
  failureThreshold: {{ .Values.probes.liveness.failureThreshold }}
startupProbe:
  httpGet:
    path: /livez
    port: http
  periodSeconds: {{ .Values.probes.startup.periodSeconds }}
  failureThreshold: {{ .Values.probes.startup.failureThreshold }}
{{- end -}}

{{/* Env of both roles: the pod's IP and name, and discovery. */}}
{{- define "presence.commonEnv" -}}
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- end -}}

{{/*
PRESENCE_WORKER_THREADS from the container's CPU request, rounded up (250m and 500m give 1,
1500m gives 2); the workloads include it unless config.workerThreads sets it in the ConfigMap.
The chart sets no CPU limit, so the binary's own default (the CPUs it may use) would run a
worker per CPU of the node, each sleeping and waking on a fraction of a core.
The argument is the container's name.
*/}}
{{- define "presence.workersEnv" -}}
- name: PRESENCE_WORKER_THREADS
  valueFrom:
    resourceFieldRef:
      containerName: {{ . }}
      resource: requests.cpu
      divisor: "1"
{{- end -}}

{{/* The gRPC mTLS Secret's volume and mount (grpcTls.enabled), for both roles. */}}
{{- define "presence.grpcTlsVolume" -}}
- name: grpc-tls
  secret:
    secretName: {{ include "presence.grpcTlsSecret" . }}
    defaultMode: 288 # 0440: the pods' group (fsGroup) may read
{{- end -}}
{{- define "presence.grpcTlsMount" -}}
- name: grpc-tls
  mountPath: /etc/presence/grpc-tls
  readOnly: true
{{- end -}}

{{/* topologySpreadConstraints of a component: (list $ "gateway" .Values.gateway). */}}
{{- define "presence.spread" -}}
{{- $root := index . 0 -}}
{{- $component := index . 1 -}}
{{- $vals := index . 2 -}}
{{- if $vals.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml $vals.topologySpreadConstraints | nindent 2 }}
{{- else if $vals.spreadAcrossZones }}
topologySpreadConstraints:
  - maxSkew: 1
    topologyKey: topology.kubernetes.io/zone
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- include "presence.componentSelector" (list $root $component) | nindent 8 }}
  - maxSkew: 1
    topologyKey: kubernetes.io/hostname
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- include "presence.componentSelector" (list $root $component) | nindent 8 }}
{{- end }}
{{- end -}}

{{/* Egress rules of presence-service pods when networkPolicy.egress.enabled. */}}
{{- define "presence.egressRules" -}}
{{- $eg := .Values.networkPolicy.egress -}}
# DNS.
- ports:
    - port: 53
      protocol: UDP
    - port: 53
      protocol: TCP
# This release's pods: gateways -> shards (gRPC), shards -> bundled Redis.
- to:
    - podSelector:
        matchLabels:
          {{- include "presence.selectorLabels" . | nindent 10 }}
{{- if eq .Values.discovery.mode "kubernetes" }}
# The Kubernetes API (EndpointSlice watch).
- to:
    {{- range $eg.apiServerCIDRs }}
    - ipBlock:
        cidr: {{ . }}
    {{- end }}
  ports:
    {{- range $eg.apiServerPorts }}
    - port: {{ . }}
      protocol: TCP
    {{- end }}
{{- end }}
{{- with $eg.extra }}
{{ toYaml . }}
{{- end }}
{{- end -}}
