{{/*
The pod template of a worker. Arguments (dict): ctx (the root context), role, group.
role: single (a one-pod group running `--tp N`, named after the pod), rank (a rank of a
multi-node StatefulSet group; group: its name), leader / follower (rank 0 / ranks 1.. of a
LeaderWorkerSet group).
*/}}
{{- define "qwen-serve.workerPodTemplate" -}}
{{- $ := .ctx }}
{{- $role := .role }}
{{- $multi := $.Values.worker.multiNode }}
{{- $lws := has $role (list "leader" "follower") }}
{{- $serves := has $role (list "single" "leader" "rank") }}
{{- $gpus := int (include "qwen-serve.gpusPerPod" $) }}
{{- $resources := deepCopy $.Values.worker.resources }}
{{- $requests := default (dict) $resources.requests }}
{{- $limits := default (dict) $resources.limits }}
{{- if $.Values.worker.gpu.enabled }}
{{- $_ := set $requests $.Values.worker.gpu.resourceName $gpus }}
{{- $_ := set $limits $.Values.worker.gpu.resourceName $gpus }}
{{- end }}
{{- range $k, $v := $.Values.worker.extraResources }}
{{- $_ := set $requests $k $v }}
{{- $_ := set $limits $k $v }}
{{- end }}
{{- $_ := set $resources "requests" $requests }}
{{- $_ := set $resources "limits" $limits }}
{{- $affinity := deepCopy (default (dict) $.Values.worker.affinity) }}
{{- $gpuTerms := list }}
{{- with $.Values.worker.gpu.products }}
{{- $gpuTerms = append $gpuTerms (dict "key" "nvidia.com/gpu.product" "operator" "In" "values" .) }}
{{- end }}
{{- if $.Values.worker.gpu.minComputeMajor }}
{{- $gpuTerms = append $gpuTerms (dict "key" "nvidia.com/gpu.compute.major" "operator" "Gt" "values" (list (toString (sub (int $.Values.worker.gpu.minComputeMajor) 1)))) }}
{{- end }}
{{- if $gpuTerms }}
{{- if hasKey $affinity "nodeAffinity" }}
{{- fail "set worker.gpu.products / worker.gpu.minComputeMajor or worker.affinity.nodeAffinity, not both" }}
{{- end }}
{{- $_ := set $affinity "nodeAffinity" (dict "requiredDuringSchedulingIgnoredDuringExecution" (dict "nodeSelectorTerms" (list (dict "matchExpressions" $gpuTerms)))) }}
{{- end -}}
metadata:
  labels:
    {{- include "qwen-serve.labels" (dict "ctx" $ "component" "worker") | nindent 4 }}
    # group: a one-pod group; rank: a rank of a StatefulSet group; leader / follower: rank 0 /
    # the other ranks of a LeaderWorkerSet group. Metrics are scraped from all but followers.
    qwen-serve.io/role: {{ ternary "group" $role (eq $role "single") }}
    {{- with .group }}
    qwen-serve.io/group: {{ . }}
    {{- if $.Values.worker.gangScheduling.enabled }}
    # The group's PodGroup (scheduler-plugins' coscheduling).
    scheduling.x-k8s.io/pod-group: {{ . }}
    {{- end }}
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
  {{- if and $multi $.Values.worker.gangScheduling.enabled }}
  schedulerName: {{ $.Values.worker.gangScheduling.schedulerName }}
  {{- end }}
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
  {{- with $affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if and $.Values.worker.spread.topologyKey (has $role (list "single" "leader")) }}
  # Groups (their leaders) spread over failure domains.
  topologySpreadConstraints:
    - maxSkew: 1
      topologyKey: {{ $.Values.worker.spread.topologyKey }}
      whenUnsatisfiable: {{ $.Values.worker.spread.whenUnsatisfiable }}
      labelSelector:
        matchLabels:
          {{- include "qwen-serve.selectorLabels" (dict "ctx" $ "component" "worker") | nindent 10 }}
          qwen-serve.io/role: {{ ternary "group" $role (eq $role "single") }}
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
        {{- if $lws }}
        # LWS_* come first in the container's environment (the LWS webhook puts them there).
        - name: GROUP_INDEX
          valueFrom:
            fieldRef:
              fieldPath: metadata.labels['leaderworkerset.sigs.k8s.io/group-index']
        - name: QWEN_GROUP
          value: {{ include "qwen-serve.fullname" $ }}-worker-g$(GROUP_INDEX)
        - name: QWEN_RANK
          value: $(LWS_WORKER_INDEX)
        - name: QWEN_WORLD_SIZE
          value: $(LWS_GROUP_SIZE)
        - name: QWEN_COMM_LISTEN
          value: 0.0.0.0:29500
        # Rank 0 publishes its stable name (the others resolve it): not an address that changes
        # when the leader pod is recreated.
        - name: QWEN_COMM_ADVERTISE
          value: $(LWS_LEADER_ADDRESS)
        - name: QWEN_READY_FILE
          value: {{ $.Values.worker.readyFile }}
        {{- else if $multi }}
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
        - name: QWEN_READY_FILE
          value: {{ $.Values.worker.readyFile }}
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
        {{- if $serves }}
        - name: grpc
          containerPort: 50051
        {{- end }}
        {{- if $multi }}
        - name: comm
          containerPort: 29500
        {{- end }}
        {{- if and $.Values.metrics.enabled $serves }}
        - name: metrics
          containerPort: {{ $.Values.metrics.workerPort }}
        {{- end }}
      {{- if eq $role "follower" }}
      # Ranks 1.. serve no gRPC: ready once the group has formed and every shard is loaded
      # (the worker writes the file then). They exit by themselves when the group breaks.
      startupProbe:
        exec:
          command: ["test", "-f", {{ $.Values.worker.readyFile | quote }}]
        periodSeconds: 10
        failureThreshold: {{ div (int $.Values.worker.startupTimeoutSeconds) 10 | max 1 }}
      readinessProbe:
        exec:
          command: ["test", "-f", {{ $.Values.worker.readyFile | quote }}]
        periodSeconds: 10
      {{- else if or (eq $role "rank") $.Values.security.tls.internalSecretName }}
      # One template for every rank of a StatefulSet group, or mutual TLS (Kubernetes' gRPC
      # probes speak cleartext only; routers check the workers' gRPC health themselves, over
      # mTLS): rank 0 is checked by connecting to its port, the others by the group-formed file.
      startupProbe:
        exec:
          command: ["/bin/bash", "-c", "if [ \"${QWEN_RANK:-0}\" = 0 ]; then exec 3<>/dev/tcp/127.0.0.1/50051; else test -f \"$QWEN_READY_FILE\"; fi"]
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
          command: ["/bin/bash", "-c", "if [ \"${QWEN_RANK:-0}\" = 0 ]; then exec 3<>/dev/tcp/127.0.0.1/50051; else test -f \"$QWEN_READY_FILE\"; fi"]
        periodSeconds: 5
        timeoutSeconds: 3
      {{- else }}
      # gRPC starts once the model is loaded (and, for a group's rank 0, once every rank has
      # joined); "" (overall) for liveness, the Worker service (NOT_SERVING while draining or
      # while an engine step is stuck) for readiness.
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
      {{- if $multi }}
      lifecycle:
        preStop:
          exec:
            # Rank 0: nothing, its SIGTERM starts the drain. The other ranks stay for the drain (a
            # rank leaving would break the group under running requests) and exit with rank 0.
            command: ["/bin/bash", "-c", "[ \"$QWEN_RANK\" = 0 ] || sleep $((QWEN_DRAIN_TIMEOUT_SECS + 5))"]
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
