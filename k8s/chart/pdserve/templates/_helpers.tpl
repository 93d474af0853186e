{{/* Names, labels, and the two files pdserve reads (cluster.yaml, autoscaling.yaml). */}}

{{- define "pdserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The RayService's name; KubeRay appends suffixes to it, so it stays short. */}}
{{- define "pdserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else if contains (include "pdserve.name" .) .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "pdserve.name" .) | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "pdserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pdserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "pdserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "pdserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* pdserve patches the worker groups itself only when KubeRay's autoscaler is off. */}}
{{- define "pdserve.patchesWorkerGroups" -}}
{{- if and .Values.autoscaling.enabled (not .Values.enableInTreeAutoscaling) }}true{{ end }}
{{- end }}

{{/* The pools `mode` deploys, as JSON (fromJsonArray): prefill and decode, or the adaptive pools
     (pools.adaptive, and each pools.adaptive-<name>) whose engines each prefill, decode and move
     KV either way. */}}
{{- define "pdserve.roles" -}}
{{- $v := .Values }}
{{- $extra := list }}
{{- range $key := keys $v.pools | sortAlpha }}
{{- if hasPrefix "adaptive-" $key }}
{{- if ne $v.mode "adaptive" }}
{{- fail (printf "pools.%s is an adaptive pool: it deploys only with mode adaptive, not %s" $key $v.mode) }}
{{- end }}
{{- $extra = append $extra $key }}
{{- end }}
{{- end }}
{{- if eq $v.mode "adaptive" }}{{ prepend $extra "adaptive" | toJson }}{{ else }}["prefill", "decode"]{{ end }}
{{- end }}

{{/* A pool's values, as JSON (fromJson): pools.<role>; a pools.adaptive-<name> pool takes every
     field it does not set from pools.adaptive. Call with (list $ role). */}}
{{- define "pdserve.pool" -}}
{{- $pools := (index . 0).Values.pools }}{{ $role := index . 1 }}
{{- if hasPrefix "adaptive-" $role }}
{{- mergeOverwrite (deepCopy $pools.adaptive) (deepCopy (index $pools $role)) | toJson }}
{{- else }}
{{- index $pools $role | toJson }}
{{- end }}
{{- end }}

{{/* Whether a pool's pods run KV receivers ("true" or empty): decode's, or every adaptive pool's. */}}
{{- define "pdserve.receivesKv" -}}
{{- if or (eq . "decode") (eq . "adaptive") (hasPrefix "adaptive-" .) }}true{{ end }}
{{- end }}

{{/* Whether a pool's pods send KV ("true" or empty): prefill's, or every adaptive pool's. Such pods
     carry the label pdserve.io/kv-sender, which the NetworkPolicy of the receivers selects. */}}
{{- define "pdserve.sendsKv" -}}
{{- if or (eq . "prefill") (eq . "adaptive") (hasPrefix "adaptive-" .) }}true{{ end }}
{{- end }}

{{/* Worker group of a pool: "<pool>-<accelerator>", e.g. prefill-h100. Call with (list $ "prefill"). */}}
{{- define "pdserve.groupName" -}}
{{- $pool := include "pdserve.pool" . | fromJson }}
{{- printf "%s-%s" (index . 1) (regexReplaceAll "[^a-z0-9]+" (lower $pool.acceleratorType) "-") | trimSuffix "-" }}
{{- end }}

{{/* Pods holding n engine replicas: ceil(n / replicasPerPod). Call with (list n replicasPerPod). */}}
{{- define "pdserve.pods" -}}
{{- $n := int (index . 0) }}{{ $per := int (index . 1) }}
{{- div (add $n $per -1) $per }}
{{- end }}

{{/* Ray resource that keeps each pool's replicas in its own worker group, even when both
     pools use the same GPU type. */}}
{{- define "pdserve.poolResource" -}}
pdserve_pool:{{ . }}
{{- end }}

{{- define "pdserve.kvSecretName" -}}
{{- .Values.kvTransfer.existingSecret | default (printf "%s-kv" (include "pdserve.fullname" .)) }}
{{- end }}

{{- define "pdserve.rayAuthSecretName" -}}
{{- .Values.rayAuth.existingSecret | default (printf "%s-ray-auth" (include "pdserve.fullname" .)) }}
{{- end }}

{{/* Where the caches that default to the home directory go (an emptyDir: the root filesystem is read-only). */}}
{{- define "pdserve.cacheDir" -}}
/var/cache/pdserve
{{- end }}

{{/* Where the head mounts the gRPC TLS Secret (ingress.grpcTls). */}}
{{- define "pdserve.grpcTlsDir" -}}
/etc/pdserve-grpc-tls
{{- end }}

{{/* Empty when no API keys are configured. */}}
{{- define "pdserve.apiKeysSecretName" -}}
{{- if .Values.apiKeys.existingSecret }}{{ .Values.apiKeys.existingSecret }}
{{- else if .Values.apiKeys.keys }}{{ printf "%s-api-keys" (include "pdserve.fullname" .) }}
{{- end }}
{{- end }}

{{/* cluster.yaml (pdserve/config/cluster.py's ClusterConfig); the KV secret comes from env. */}}
{{- define "pdserve.clusterConfig" -}}
{{- $v := .Values }}
{{- $cfg := dict "model" $v.model "served_model_name" $v.servedModelName "dtype" $v.dtype
      "max_model_len" $v.maxModelLen "mode" $v.mode "app_name" "pdserve"
      "slo" (dict "ttft_ms" $v.slo.ttftMs "tpot_ms" $v.slo.tpotMs)
      "ingress" (dict "host" "0.0.0.0" "http_port" $v.ingress.httpPort "grpc_port" $v.ingress.grpcPort "direct_http_port" $v.ingress.directHttpPort "resources" (dict "pdserve_ingress" 1)) }}
{{- with $v.toolCallParser }}
{{- $_ := set $cfg "tool_call_parser" . }}
{{- end }}
{{- with $v.ingress.grpcTls.existingSecret }}
{{- $dir := include "pdserve.grpcTlsDir" $ }}
{{- $_ := set $cfg.ingress "grpc_tls_cert_file" (printf "%s/tls.crt" $dir) }}
{{- $_ := set $cfg.ingress "grpc_tls_key_file" (printf "%s/tls.key" $dir) }}
{{- if $v.ingress.grpcTls.requireClientCerts }}
{{- $_ := set $cfg.ingress "grpc_tls_client_ca_file" (printf "%s/ca.crt" $dir) }}
{{- end }}
{{- end }}
{{- $receivesKv := list }}
{{- range $role := include "pdserve.roles" . | fromJsonArray }}
{{- $p := include "pdserve.pool" (list $ $role) | fromJson }}
{{- $ranks := int (get ($p.engineArgs | default dict) "tensor_parallel_size" | default 1) }}
{{- if include "pdserve.receivesKv" $role }}{{ $receivesKv = append $receivesKv (mul (int $p.replicasPerPod) $ranks) }}{{ end }}
{{- if or (lt $p.replicas $p.minReplicas) (gt $p.replicas $p.maxReplicas) }}
{{- fail (printf "pools.%s.replicas (%v) must lie within minReplicas (%v) and maxReplicas (%v)" $role $p.replicas $p.minReplicas $p.maxReplicas) }}
{{- end }}
{{- $pool := dict "replicas" $p.replicas "accelerator_type" $p.acceleratorType "num_gpus" $p.gpusPerReplica
      "num_cpus" $p.cpusPerReplica "resources" (dict (include "pdserve.poolResource" $role) 1) }}
{{- with $p.engineArgs }}{{ $_ := set $pool "engine_args" . }}{{ end }}
{{- if hasPrefix "adaptive-" $role }}
{{- $_ := set $cfg "adaptive_pools" (merge (dict (trimPrefix "adaptive-" $role) $pool) ($cfg.adaptive_pools | default dict)) }}
{{- else }}
{{- $_ := set $cfg $role $pool }}
{{- end }}
{{- end }}
{{- if and $v.autoscaling.enabled (ne $v.mode "disaggregated") }}
{{- fail (printf "autoscaling sizes the prefill and decode pools: mode %s needs autoscaling.enabled=false (the adaptive pool stays at pools.adaptive.replicas)" $v.mode) }}
{{- end }}
{{- if $v.autoscaling.enabled }}
{{- $as := dict "policy_file" "/etc/pdserve/autoscaling.yaml" }}
{{- if include "pdserve.patchesWorkerGroups" . }}
{{- $_ := set $as "kubernetes" (dict "namespace" .Release.Namespace "rayservice" (include "pdserve.fullname" .)
      "worker_groups" (dict "prefill" (include "pdserve.groupName" (list . "prefill")) "decode" (include "pdserve.groupName" (list . "decode")))
      "replicas_per_pod" (dict "prefill" $v.pools.prefill.replicasPerPod "decode" $v.pools.decode.replicasPerPod)
      "in_cluster" true) }}
{{- end }}
{{- $_ := set $cfg "autoscaling" $as }}
{{- end }}
{{- /* Fixed KV receiver ports, one per tensor-parallel rank of each receiving replica of a pod (of
       the pool with the most): the NetworkPolicy names them. */}}
{{- $receivers := ternary "adaptive*" "decode" (eq $v.mode "adaptive") }}
{{- $_ := set $cfg "kv_receiver_port" $v.kvTransfer.port }}
{{- $count := 1 }}{{ range $receivesKv }}{{ $count = max $count . }}{{ end }}
{{- $_ := set $cfg "kv_receiver_port_count" $count }}
{{- $cfg = mergeOverwrite $cfg (deepCopy $v.clusterConfigOverrides) }}
{{- $kvFirst := int $cfg.kv_receiver_port }}{{ $kvLast := add $kvFirst (int $cfg.kv_receiver_port_count) -1 }}
{{- $rayPorts := list 6379 8080 8265 10001 52365 (int $cfg.ingress.http_port) (int $cfg.ingress.grpc_port) }}
{{- with $cfg.ingress.direct_http_port }}{{ $rayPorts = append $rayPorts (int .) }}{{ end }}
{{- range $port := $rayPorts }}
{{- if and (le $kvFirst $port) (ge $kvLast $port) }}
{{- fail (printf "the KV receiver ports %d-%d (kvTransfer.port, pools.%s.replicasPerPod x TP size) include %d, a port Ray or the ingress uses" $kvFirst $kvLast $receivers $port) }}
{{- end }}
{{- end }}
{{- if and $v.networkPolicy.enabled (lt $kvFirst 1024) }}
{{- fail "the NetworkPolicy names the KV receiver ports: kv_receiver_port must be a fixed port from 1024 (kvTransfer.port)" }}
{{- end }}
{{- if and (le $kvFirst 19999) (ge $kvLast 10002) }}
{{- fail (printf "the KV receiver ports %d-%d (kvTransfer.port, pools.%s.replicasPerPod x TP size) overlap Ray's worker ports 10002-19999" $kvFirst $kvLast $receivers) }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/* autoscaling.yaml (pdserve/config/autoscaling_policy.py): the user's policy, with each pool's
     bounds and objective taken from pools and slo so they cannot disagree with the groups. */}}
{{- define "pdserve.policy" -}}
{{- $v := .Values }}
{{- $policy := deepCopy $v.autoscaling.policy }}
{{- $objective := dict "prefill" (dict "ttft_ms" $v.slo.ttftMs) "decode" (dict "tpot_ms" $v.slo.tpotMs) }}
{{- range $role := list "prefill" "decode" }}
{{- $p := index $v.pools $role }}
{{- $_ := set $policy $role (mergeOverwrite (index $policy $role | default dict) (index $objective $role)
      (dict "accelerator_type" $p.acceleratorType "gpus_per_replica" $p.gpusPerReplica
            "min_replicas" $p.minReplicas "max_replicas" $p.maxReplicas)) }}
{{- end }}
{{- toYaml $policy }}
{{- end }}

{{/* What every Ray container gets: its security context, the config files, writable
     scratch space (the root filesystem is read-only), extra mounts; the head's also gets the
     secrets, since only processes there read them. Call with (list $ "head"), "prefill" or "decode". */}}
{{- define "pdserve.containerCommon" -}}
{{- $top := index . 0 }}{{ $role := index . 1 }}
{{- $cache := include "pdserve.cacheDir" $top -}}
image: "{{ $top.Values.image.repository }}:{{ $top.Values.image.tag | default $top.Chart.AppVersion }}"
imagePullPolicy: {{ $top.Values.image.pullPolicy }}
securityContext:
  {{- toYaml $top.Values.securityContext | nindent 2 }}
env:
  # Caches that default to the (read-only) home directory: vLLM's and Hugging Face's, vLLM's
  # config and usage stats, Triton's, FlashInfer's and CUDA's kernel caches.
  - {name: XDG_CACHE_HOME, value: {{ $cache }}}
  - {name: XDG_CONFIG_HOME, value: {{ $cache }}/config}
  - {name: TRITON_HOME, value: {{ $cache }}}
  - {name: FLASHINFER_WORKSPACE_BASE, value: {{ $cache }}}
  - {name: CUDA_CACHE_PATH, value: {{ $cache }}/nv}
  {{- if eq $role "head" }}
  # The application build (Serve runs it beside its controller, on the head) reads the KV secret
  # and hands it to the engines; the ingress, pinned to the head, reads the API keys.
  - name: PDSERVE_KV_SECRET
    valueFrom:
      secretKeyRef:
        name: {{ include "pdserve.kvSecretName" $top }}
        key: {{ ternary $top.Values.kvTransfer.existingSecretKey "kv-secret" (ne $top.Values.kvTransfer.existingSecret "") }}
  {{- with include "pdserve.apiKeysSecretName" $top }}
  - name: PDSERVE_API_KEYS
    valueFrom:
      secretKeyRef:
        name: {{ . }}
        key: {{ ternary $top.Values.apiKeys.existingSecretKey "api-keys" (ne $top.Values.apiKeys.existingSecret "") }}
  {{- end }}
  {{- end }}
volumeMounts:
  - name: pdserve-config
    mountPath: /etc/pdserve
    readOnly: true
  - name: dshm
    mountPath: /dev/shm
  - name: tmp
    mountPath: /tmp
  - name: cache
    mountPath: {{ $cache }}
  {{- if and (eq $role "head") $top.Values.ingress.grpcTls.existingSecret }}
  - name: grpc-tls
    mountPath: {{ include "pdserve.grpcTlsDir" $top }}
    readOnly: true
  {{- end }}
  {{- with $top.Values.extraVolumeMounts }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}

{{/* Pod-level settings shared by head and workers. Call with (list $ "head"), "prefill" or "decode". */}}
{{- define "pdserve.podCommon" -}}
{{- $top := index . 0 }}{{ $role := index . 1 -}}
securityContext:
  {{- toYaml $top.Values.podSecurityContext | nindent 2 }}
volumes:
  - name: pdserve-config
    configMap:
      name: {{ include "pdserve.fullname" $top }}-config
  # Ray's object store and vLLM's workers use shared memory; a container's default is 64 MiB.
  - name: dshm
    emptyDir: {medium: Memory}
  # Ray's session dir (/tmp/ray: logs, sockets, spilled objects) and other scratch files.
  - name: tmp
    emptyDir: {}
  - name: cache
    emptyDir: {}
  {{- if and (eq $role "head") $top.Values.ingress.grpcTls.existingSecret }}
  # The gRPC ingress's certificate and key, on the head only, where the ingress serves gRPC.
  - name: grpc-tls
    secret:
      secretName: {{ $top.Values.ingress.grpcTls.existingSecret }}
      items:
        - {key: tls.crt, path: tls.crt}
        - {key: tls.key, path: tls.key}
        {{- if $top.Values.ingress.grpcTls.requireClientCerts }}
        - {key: ca.crt, path: ca.crt}
        {{- end }}
  {{- end }}
  {{- with $top.Values.extraVolumes }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- if ne $role "head" }}
# Nothing on a worker calls the Kubernetes API.
automountServiceAccountToken: false
{{- else if include "pdserve.patchesWorkerGroups" $top }}
# pdserve's controller, pinned to the head, patches the worker groups with this account's token.
serviceAccountName: {{ include "pdserve.fullname" $top }}
{{- else if not $top.Values.enableInTreeAutoscaling }}
# Nothing on the head calls the Kubernetes API either (KubeRay's autoscaler sidecar would, with
# the account KubeRay gives the head).
automountServiceAccountToken: false
{{- end }}
{{- with $top.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
