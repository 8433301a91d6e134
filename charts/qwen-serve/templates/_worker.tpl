{{/*
The pod template of a worker. Arguments (dict): ctx (the root context), group (multi-node: the
group's name; empty: one pod per group, named after the pod).
*/}}
{{- define "qwen-serve.workerPodTemplate" -}}
{{- $ := .ctx }}
{{- $multi := $.Values.worker.multiNode }}
{{- $gpus := int (include "qwen-serve.gpusPerPod" $) }}
{{- $resources := deepCopy $.Values.worker.resources }}
{{- if $.Values.worker.gpu.enabled }}
{{- $requests := default (dict) $resources.requests }}
{{- $limits := default (dict) $resources.limits }}
{{- $_ := set $requests $.Values.worker.gpu.resourceName $gpus }}
{{- $_ := set $limits $.Values.worker.gpu.resourceName $gpus }}
{{- $_ := set $resources "requests" $requests }}
{{- $_ := set $resources "limits" $limits }}
{{- end -}}
metadata:
  labels:
    {{- include "qwen-serve.labels" (dict "ctx" $ "component" "worker") | nindent 4 }}
    {{- with .group }}
    qwen-serve.io/group: {{ . }}
    {{- end }}
    {{- with $.Values.worker.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    checksum/config: {{ include (print $.Template.BasePath "/configmap.yaml") $ | sha256sum }}
    {{- with $.Values.worker.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "qwen-serve.serviceAccountName" $ }}
  automountServiceAccountToken: false
  enableServiceLinks: false
  # On SIGTERM the worker drains by itself: gRPC health NOT_SERVING, it leaves etcd, running
  # requests finish for up to QWEN_DRAIN_TIMEOUT_SECS; the grace period exceeds that.
  terminationGracePeriodSeconds: {{ include "qwen-serve.workerGrace" $ }}
  {{- with $.Values.worker.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with $.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $.Values.podSecurityContext | nindent 4 }}
  {{- with $.Values.worker.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $.Values.worker.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $.Values.worker.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: worker
      image: {{ include "qwen-serve.workerImage" $ | quote }}
      imagePullPolicy: {{ $.Values.image.pullPolicy }}
      command: ["qwen-worker", "serve"]
      {{- with $.Values.worker.extraArgs }}
      args:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      envFrom:
        # QWEN_ETCD, QWEN_LOG_FORMAT, QWEN_OTLP_ENDPOINT.
        - configMapRef:
            name: {{ include "qwen-serve.fullname" $ }}-config
      env:
        - name: POD_NAME
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
        - name: POD_IP
          valueFrom:
            fieldRef:
              fieldPath: status.podIP
        - name: QWEN_MODEL
          value: {{ include "qwen-serve.modelPath" $ | quote }}
        - name: QWEN_MODEL_NAME
          value: {{ include "qwen-serve.modelName" $ | quote }}
        - name: QWEN_DTYPE
          value: {{ $.Values.model.dtype | quote }}
        # Each rank on its own GPU of the pod (rank r: GPU r; one GPU per pod when multi-node).
        - name: QWEN_DEVICE
          value: {{ if $.Values.worker.gpu.enabled }}cuda{{ else }}cpu{{ end }}
        {{- if $multi }}
        # Rank = pod ordinal; world size = replicas of this StatefulSet.
        - name: QWEN_GROUP
          value: {{ .group | quote }}
        - name: QWEN_RANK
          valueFrom:
            fieldRef:
              fieldPath: metadata.labels['apps.kubernetes.io/pod-index']
        - name: QWEN_WORLD_SIZE
          value: {{ $.Values.worker.tp | quote }}
        - name: QWEN_COMM_LISTEN
          value: 0.0.0.0:29500
        - name: QWEN_COMM_ADVERTISE
          value: $(POD_IP)
        {{- else }}
        # The group is the pod (unique, stable name); --tp N rank processes run inside it.
        - name: QWEN_GROUP
          value: $(POD_NAME)
        - name: QWEN_TP
          value: {{ $.Values.worker.tp | quote }}
        {{- end }}
        - name: QWEN_COLLECTIVE_TIMEOUT_MS
          value: {{ $.Values.worker.collectiveTimeoutMs | quote }}
        - name: QWEN_LISTEN
          value: 0.0.0.0:50051
        - name: QWEN_ADVERTISE_ADDR
          value: $(POD_IP):50051
        {{- if $.Values.metrics.enabled }}
        - name: QWEN_METRICS_LISTEN
          value: 0.0.0.0:{{ $.Values.metrics.workerPort }}
        {{- end }}
        {{- if $.Values.worker.kvCacheBytes }}
        - name: QWEN_KV_CACHE_BYTES
          value: {{ $.Values.worker.kvCacheBytes | int64 | quote }}
        {{- else }}
        - name: QWEN_KV_CACHE_FRACTION
          value: {{ $.Values.worker.kvCacheFraction | quote }}
        {{- end }}
        - name: QWEN_MAX_BATCH_TOKENS
          value: {{ $.Values.worker.maxBatchTokens | quote }}
        - name: QWEN_MAX_SEQS
          value: {{ $.Values.worker.maxSeqs | quote }}
        - name: QWEN_REGISTRATION_TTL_SECS
          value: {{ $.Values.worker.registrationTtlSecs | quote }}
        - name: QWEN_DRAIN_TIMEOUT_SECS
          value: {{ $.Values.worker.drainTimeoutSecs | quote }}
        {{- include "qwen-serve.securityEnv" (dict "ctx" $ "component" "worker") | nindent 8 }}
        {{- with $.Values.worker.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      ports:
        - name: grpc
          containerPort: 50051
        {{- if $multi }}
        - name: comm
          containerPort: 29500
        {{- end }}
        {{- if $.Values.metrics.enabled }}
        - name: metrics
          containerPort: {{ $.Values.metrics.workerPort }}
        {{- end }}
      {{- if or $multi $.Values.security.tls.internalSecretName }}
      # One template for every rank and only rank 0 has a gRPC port: rank 0 is checked by
      # connecting to it; the others pass (they exit by themselves when the group breaks). Under
      # mutual TLS too, as Kubernetes' gRPC probes speak cleartext only (routers check the
      # workers' gRPC health themselves, over mTLS).
      startupProbe:
        exec:
          command: ["/bin/bash", "-c", "[ \"${QWEN_RANK:-0}\" != 0 ] || exec 3<>/dev/tcp/127.0.0.1/50051"]
        periodSeconds: 10
        failureThreshold: {{ div (int $.Values.worker.startupTimeoutSeconds) 10 | max 1 }}
      livenessProbe:
        exec:
          command: ["/bin/bash", "-c", "[ \"${QWEN_RANK:-0}\" != 0 ] || exec 3<>/dev/tcp/127.0.0.1/50051"]
        periodSeconds: 10
        timeoutSeconds: 5
        failureThreshold: 3
      readinessProbe:
        exec:
          command: ["/bin/bash", "-c", "[ \"${QWEN_RANK:-0}\" != 0 ] || exec 3<>/dev/tcp/127.0.0.1/50051"]
        periodSeconds: 5
        timeoutSeconds: 3
      {{- end }}
      {{- if $multi }}
      lifecycle:
        preStop:
          exec:
            # Rank 0: nothing, its SIGTERM starts the drain. The other ranks stay for the drain (a
            # rank leaving would break the group under running requests) and exit with rank 0.
            command: ["/bin/bash", "-c", "[ \"$QWEN_RANK\" = 0 ] || sleep $((QWEN_DRAIN_TIMEOUT_SECS + 5))"]
      {{- end }}
      {{- if not (or $multi $.Values.security.tls.internalSecretName) }}
      # gRPC starts once the model is loaded; "" (overall) for liveness, the Worker service
      # (NOT_SERVING while draining) for readiness.
      startupProbe:
        grpc:
          port: 50051
        periodSeconds: 10
        failureThreshold: {{ div (int $.Values.worker.startupTimeoutSeconds) 10 | max 1 }}
      livenessProbe:
        grpc:
          port: 50051
        periodSeconds: 10
        timeoutSeconds: 5
        failureThreshold: 3
      readinessProbe:
        grpc:
          port: 50051
          service: qwen.worker.v1.Worker
        periodSeconds: 5
        timeoutSeconds: 3
        failureThreshold: 2
      {{- end }}
      resources:
        {{- toYaml $resources | nindent 8 }}
      securityContext:
        {{- toYaml $.Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: models
          mountPath: {{ $.Values.model.mountPath }}
          readOnly: true
        - name: tmp
          mountPath: /tmp
        {{- if $.Values.worker.gpu.enabled }}
        - name: dshm
          mountPath: /dev/shm
        {{- end }}
        {{- include "qwen-serve.securityMounts" (dict "ctx" $ "component" "worker") | nindent 8 }}
  volumes:
    - name: models
      {{- if $.Values.model.volume }}
      {{- toYaml $.Values.model.volume | nindent 6 }}
      {{- else }}
      persistentVolumeClaim:
        claimName: {{ $.Values.model.pvc.claimName }}
        readOnly: true
      {{- end }}
    - name: tmp
      emptyDir: {}
    {{- include "qwen-serve.securityVolumes" (dict "ctx" $ "component" "worker") | nindent 4 }}
    {{- if $.Values.worker.gpu.enabled }}
    # NCCL's shared-memory transport needs more than the 64 MiB default.
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $.Values.worker.shmSize }}
    {{- end }}
{{- end }}
