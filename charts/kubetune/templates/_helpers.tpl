{{/* Chart name, truncated to the 63 characters of a label value. */}}
{{- define "kubetune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: unique per release, so several releases can share a cluster. */}}
{{- define "kubetune.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "kubetune.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kubetune.labels" -}}
helm.sh/chart: {{ include "kubetune.chart" . }}
{{ include "kubetune.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: kubetune
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "kubetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kubetune.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kubetune.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "kubetune.trainerImage" -}}
{{- default (printf "ghcr.io/kubetune/trainer:%s" .Chart.AppVersion) .Values.operator.trainerImage -}}
{{- end -}}

{{- define "kubetune.leaseName" -}}
{{- default (include "kubetune.fullname" .) .Values.leaderElection.leaseName -}}
{{- end -}}

{{/* Cluster-wide when no namespace is listed. */}}
{{- define "kubetune.clusterwide" -}}
{{- if not .Values.watchNamespaces }}true{{ end -}}
{{- end -}}

{{/*
What the operator itself does with the API (kubetune_operator.reconcile and
the kopf watches in kubetune_operator.handlers); nothing more.
*/}}
{{- define "kubetune.operatorRules" -}}
# FineTuningJobs: watched and read; only their status is ever written, except
# for a FineTuningSweep's trials, which the operator creates and cancels
# (spec.cancel, when the median stopping rule stops one).
- apiGroups: ["kubetune.dev"]
  resources: ["finetuningjobs"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["kubetune.dev"]
  resources: ["finetuningjobs/status"]
  verbs: ["patch"]
# FineTuningSweeps: watched and read; only their status is ever written.
- apiGroups: ["kubetune.dev"]
  resources: ["finetuningsweeps"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["kubetune.dev"]
  resources: ["finetuningsweeps/status"]
  verbs: ["patch"]
# ModelMerges: watched and read; only their status is ever written.
- apiGroups: ["kubetune.dev"]
  resources: ["modelmerges"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["kubetune.dev"]
  resources: ["modelmerges/status"]
  verbs: ["patch"]
# RegisteredModels: watched (is a job's registration name free?) and created
# once; never changed or deleted.
- apiGroups: ["kubetune.dev"]
  resources: ["registeredmodels"]
  verbs: ["get", "list", "watch", "create"]
# The validation and training Jobs: suspended/resumed by patch, replaced by delete.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Kueue's Workloads of training Jobs: watched for what the queue says, and
# (de)activated to pause or resume a queued job (Kueue owns its Job's suspend).
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads"]
  verbs: ["get", "list", "watch", "patch"]
# Training pods are watched for progress and failures, never created directly.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
# The headless Service that gives the pods of a multi-node job stable names.
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "create"]
# Events: a FineTuningJob started, succeeded, failed, was registered; warnings.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end -}}
