{{/* Names. */}}
{{- define "qwen-serve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "qwen-serve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "qwen-serve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "qwen-serve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "qwen-serve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Labels: common ones, and the selector labels of a component (pass dict "ctx" . "component" "router"). */}}
{{- define "qwen-serve.labels" -}}
helm.sh/chart: {{ include "qwen-serve.chart" .ctx }}
{{ include "qwen-serve.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: qwen-serve
{{- end }}

{{- define "qwen-serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "qwen-serve.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Images. */}}
{{- define "qwen-serve.routerImage" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{- define "qwen-serve.workerImage" -}}
{{- if .Values.worker.image }}
{{- .Values.worker.image }}
{{- else if and .Values.worker.gpu.enabled .Values.image.cudaDigest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.cudaDigest }}
{{- else if and (not .Values.worker.gpu.enabled) .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.worker.gpu.enabled }}
{{- $tag = printf "%s%s" $tag .Values.image.cudaTagSuffix }}
{{- end }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* etcd client endpoints (comma-separated), bundled or external. */}}
{{- define "qwen-serve.etcdEndpoints" -}}
{{- if .Values.etcd.enabled }}
{{- $fullname := include "qwen-serve.fullname" . }}
{{- $eps := list }}
{{- range $i := until (int .Values.etcd.replicas) }}
{{- $eps = append $eps (printf "http://%s-etcd-%d.%s-etcd-headless:2379" $fullname $i $fullname) }}
{{- end }}
{{- join "," $eps }}
{{- else }}
{{- if not .Values.etcd.externalEndpoints }}
{{- fail "etcd.enabled=false needs etcd.externalEndpoints (a list of http://host:2379 URLs)" }}
{{- end }}
{{- join "," .Values.etcd.externalEndpoints }}
{{- end }}
{{- end }}

{{/* The model directory inside the container. */}}
{{- define "qwen-serve.modelPath" -}}
{{- if hasPrefix "/" .Values.model.path }}
{{- .Values.model.path }}
{{- else }}
{{- printf "%s/%s" (trimSuffix "/" .Values.model.mountPath) .Values.model.path }}
{{- end }}
{{- end }}

{{- define "qwen-serve.modelName" -}}
{{- default (base (include "qwen-serve.modelPath" .)) .Values.model.name }}
{{- end }}

{{/* GPUs per worker pod: the whole group on one node, one rank per pod across nodes. */}}
{{- define "qwen-serve.gpusPerPod" -}}
{{- if .Values.worker.multiNode }}1{{ else }}{{ int .Values.worker.tp }}{{ end }}
{{- end }}

{{/* Worker termination grace: the drain plus a margin (and the followers' wait, multi-node). */}}
{{- define "qwen-serve.workerGrace" -}}
{{- if .Values.worker.terminationGracePeriodSeconds }}
{{- int .Values.worker.terminationGracePeriodSeconds }}
{{- else }}
{{- add (int .Values.worker.drainTimeoutSecs) 30 (ternary 15 0 .Values.worker.multiNode) }}
{{- end }}
{{- end }}

{{/* Checks of value combinations that the schema cannot express. */}}
{{- define "qwen-serve.validate" -}}
{{- if and .Values.worker.multiNode (lt (int .Values.worker.tp) 2) }}
{{- fail "worker.multiNode=true needs worker.tp >= 2 (the group's world size: one pod per rank)" }}
{{- end }}
{{- if and .Values.worker.gangScheduling.enabled (not .Values.worker.multiNode) }}
{{- fail "worker.gangScheduling needs worker.multiNode=true (a one-pod group is scheduled whole anyway)" }}
{{- end }}
{{- if and .Values.etcd.enabled (eq (mod (int .Values.etcd.replicas) 2) 0) }}
{{- fail "etcd.replicas must be odd (1, 3 or 5)" }}
{{- end }}
{{- $etcdSec := .Values.security.etcd }}
{{- if and .Values.etcd.enabled (or $etcdSec.tlsSecretName $etcdSec.routerUser $etcdSec.workerUser) }}
{{- fail "security.etcd (TLS, users) is for an external etcd: set etcd.enabled=false and https:// etcd.externalEndpoints" }}
{{- end }}
{{- if and (or $etcdSec.routerUser $etcdSec.workerUser) (not $etcdSec.passwordSecretName) }}
{{- fail "security.etcd.routerUser/workerUser need security.etcd.passwordSecretName (keys router-password, worker-password)" }}
{{- end }}
{{- if and .Values.worker.terminationGracePeriodSeconds (le (int .Values.worker.terminationGracePeriodSeconds) (int .Values.worker.drainTimeoutSecs)) }}
{{- fail "worker.terminationGracePeriodSeconds must exceed worker.drainTimeoutSecs, or the drain is cut short" }}
{{- end }}
{{- end }}

{{/*
Security settings as environment variables (dict: ctx, component = router | worker): API keys
and public TLS (routers), mutual TLS between routers, workers and ranks, etcd TLS and users.
Every file comes from a Secret mounted by qwen-serve.securityVolumes under /etc/qwen-serve.
*/}}
{{- define "qwen-serve.securityEnv" -}}
{{- $ := .ctx }}
{{- $s := $.Values.security }}
{{- $router := eq .component "router" }}
{{- if $s.etcd.tlsSecretName }}
- name: QWEN_ETCD_CA
  value: /etc/qwen-serve/etcd-tls/ca.crt
{{- if $s.etcd.clientCert }}
- name: QWEN_ETCD_CERT
  value: /etc/qwen-serve/etcd-tls/tls.crt
- name: QWEN_ETCD_KEY
  value: /etc/qwen-serve/etcd-tls/tls.key
{{- end }}
{{- end }}
{{- $user := ternary $s.etcd.routerUser $s.etcd.workerUser $router }}
{{- if $user }}
- name: QWEN_ETCD_USER
  value: {{ $user | quote }}
- name: QWEN_ETCD_PASSWORD_FILE
  value: /etc/qwen-serve/etcd-password/{{ .component }}-password
{{- end }}
{{- if $s.tls.internalSecretName }}
{{- if $router }}
- name: QWEN_ROUTER_WORKER_TLS_CA
  value: /etc/qwen-serve/tls-internal/ca.crt
- name: QWEN_ROUTER_WORKER_TLS_CERT
  value: /etc/qwen-serve/tls-internal/tls.crt
- name: QWEN_ROUTER_WORKER_TLS_KEY
  value: /etc/qwen-serve/tls-internal/tls.key
- name: QWEN_ROUTER_WORKER_TLS_SERVER_NAME
  value: {{ $s.tls.internalServerName | quote }}
{{- else }}
- name: QWEN_TLS_CERT
  value: /etc/qwen-serve/tls-internal/tls.crt
- name: QWEN_TLS_KEY
  value: /etc/qwen-serve/tls-internal/tls.key
- name: QWEN_TLS_CLIENT_CA
  value: /etc/qwen-serve/tls-internal/ca.crt
- name: QWEN_TLS_PEER_NAME
  value: {{ $s.tls.internalServerName | quote }}
{{- end }}
{{- end }}
{{- if $router }}
{{- if $s.tls.publicSecretName }}
- name: QWEN_ROUTER_TLS_CERT
  value: /etc/qwen-serve/tls-public/tls.crt
- name: QWEN_ROUTER_TLS_KEY
  value: /etc/qwen-serve/tls-public/tls.key
{{- end }}
{{- if $s.apiKeys.secretName }}
- name: QWEN_ROUTER_API_KEY_FILE
  value: /etc/qwen-serve/api-keys/{{ $s.apiKeys.secretKey }}
# Probes cannot send a key.
- name: QWEN_ROUTER_HEALTH_WITHOUT_KEY
  value: "true"
- name: QWEN_ROUTER_METRICS_WITHOUT_KEY
  value: {{ $s.apiKeys.metricsWithoutKey | quote }}
- name: QWEN_ROUTER_KEY_REQUESTS_PER_MINUTE
  value: {{ int $s.apiKeys.requestsPerMinute | quote }}
- name: QWEN_ROUTER_KEY_TOKENS_PER_MINUTE
  value: {{ int $s.apiKeys.tokensPerMinute | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* The Secrets behind qwen-serve.securityEnv, as (name, mount directory, secret) triples. */}}
{{- define "qwen-serve.securitySecrets" -}}
{{- $s := .ctx.Values.security }}
{{- $router := eq .component "router" }}
{{- $out := list }}
{{- if $s.etcd.tlsSecretName }}{{ $out = append $out (list "etcd-tls" $s.etcd.tlsSecretName) }}{{ end }}
{{- if and (ternary $s.etcd.routerUser $s.etcd.workerUser $router) $s.etcd.passwordSecretName }}{{ $out = append $out (list "etcd-password" $s.etcd.passwordSecretName) }}{{ end }}
{{- if $s.tls.internalSecretName }}{{ $out = append $out (list "tls-internal" $s.tls.internalSecretName) }}{{ end }}
{{- if and $router $s.tls.publicSecretName }}{{ $out = append $out (list "tls-public" $s.tls.publicSecretName) }}{{ end }}
{{- if and $router $s.apiKeys.secretName }}{{ $out = append $out (list "api-keys" $s.apiKeys.secretName) }}{{ end }}
{{- toJson $out }}
{{- end }}

{{- define "qwen-serve.securityMounts" -}}
{{- range (include "qwen-serve.securitySecrets" . | fromJsonArray) }}
- name: {{ index . 0 }}
  mountPath: /etc/qwen-serve/{{ index . 0 }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "qwen-serve.securityVolumes" -}}
{{- range (include "qwen-serve.securitySecrets" . | fromJsonArray) }}
- name: {{ index . 0 }}
  secret:
    secretName: {{ index . 1 }}
    defaultMode: 0444
{{- end }}
{{- end }}
