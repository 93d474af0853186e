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

{{/* Worker group of a pool: "<pool>-<accelerator>", e.g. prefill-h100. Call with (list $ "prefill"). */}}
{{- define "pdserve.groupName" -}}
{{- $pool := index (index . 0).Values.pools (index . 1) }}
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
      "max_model_len" $v.maxModelLen "mode" "disaggregated" "app_name" "pdserve"
      "slo" (dict "ttft_ms" $v.slo.ttftMs "tpot_ms" $v.slo.tpotMs)
      "ingress" (dict "host" "0.0.0.0" "http_port" $v.ingress.httpPort "grpc_port" $v.ingress.grpcPort "resources" (dict "pdserve_ingress" 1)) }}
{{- range $role := list "prefill" "decode" }}
{{- $p := index $v.pools $role }}
{{- if or (lt $p.replicas $p.minReplicas) (gt $p.replicas $p.maxReplicas) }}
{{- fail (printf "pools.%s.replicas (%v) must lie within minReplicas (%v) and maxReplicas (%v)" $role $p.replicas $p.minReplicas $p.maxReplicas) }}
{{- end }}
{{- $pool := dict "replicas" $p.replicas "accelerator_type" $p.acceleratorType "num_gpus" $p.gpusPerReplica
      "num_cpus" $p.cpusPerReplica "resources" (dict (include "pdserve.poolResource" $role) 1) }}
{{- with $p.engineArgs }}{{ $_ := set $pool "engine_args" . }}{{ end }}
{{- $_ := set $cfg $role $pool }}
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
{{- toYaml (mergeOverwrite $cfg (deepCopy $v.clusterConfigOverrides)) }}
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

{{/* What every Ray container gets: the secrets as env, the config files, extra mounts. */}}
{{- define "pdserve.containerCommon" -}}
image: "{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}"
imagePullPolicy: {{ .Values.image.pullPolicy }}
env:
  - name: PDSERVE_KV_SECRET
    valueFrom:
      secretKeyRef:
        name: {{ include "pdserve.kvSecretName" . }}
        key: {{ ternary .Values.kvTransfer.existingSecretKey "kv-secret" (ne .Values.kvTransfer.existingSecret "") }}
  {{- with include "pdserve.apiKeysSecretName" . }}
  - name: PDSERVE_API_KEYS
    valueFrom:
      secretKeyRef:
        name: {{ . }}
        key: {{ ternary $.Values.apiKeys.existingSecretKey "api-keys" (ne $.Values.apiKeys.existingSecret "") }}
  {{- end }}
volumeMounts:
  - name: pdserve-config
    mountPath: /etc/pdserve
    readOnly: true
  - name: dshm
    mountPath: /dev/shm
  {{- with .Values.extraVolumeMounts }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}

{{/* Pod-level settings shared by head and workers. */}}
{{- define "pdserve.podCommon" -}}
volumes:
  - name: pdserve-config
    configMap:
      name: {{ include "pdserve.fullname" . }}-config
  # Ray's object store and vLLM's workers use shared memory; a container's default is 64 MiB.
  - name: dshm
    emptyDir: {medium: Memory}
  {{- with .Values.extraVolumes }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- if include "pdserve.patchesWorkerGroups" . }}
serviceAccountName: {{ include "pdserve.fullname" . }}
{{- end }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
