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
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{- define "qwen-serve.workerImage" -}}
{{- if .Values.worker.image }}
{{- .Values.worker.image }}
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
{{- if and .Values.etcd.enabled (eq (mod (int .Values.etcd.replicas) 2) 0) }}
{{- fail "etcd.replicas must be odd (1, 3 or 5)" }}
{{- end }}
{{- if and .Values.worker.terminationGracePeriodSeconds (le (int .Values.worker.terminationGracePeriodSeconds) (int .Values.worker.drainTimeoutSecs)) }}
{{- fail "worker.terminationGracePeriodSeconds must exceed worker.drainTimeoutSecs, or the drain is cut short" }}
{{- end }}
{{- end }}
