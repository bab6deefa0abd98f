{{/* Name of the chart, or nameOverride. */}}
{{- define "chaos.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the release's objects: fullnameOverride, else <release>-<name> (or the release
name when it already contains the chart's name). */}}
{{- define "chaos.fullname" -}}
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

{{/* Labels of the operator's pods and the selectors of its Deployment and Services. */}}
{{- define "chaos.selectorLabels" -}}
app.kubernetes.io/name: {{ include "chaos.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Labels of every object of the release. */}}
{{- define "chaos.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "chaos.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: chaos
{{- end }}

{{- define "chaos.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "chaos.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The watched namespaces as a JSON list (watchNamespaces, else the release's). */}}
{{- define "chaos.watchNamespaces" -}}
{{- if .Values.watchNamespaces }}
{{- toJson .Values.watchNamespaces }}
{{- else }}
{{- toJson (list .Release.Namespace) }}
{{- end }}
{{- end }}

{{- define "chaos.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Where the federation identity Secret is mounted (`chaos operator --identity`). */}}
{{- define "chaos.identityDir" -}}
/etc/chaos/identity
{{- end }}

{{/* Name of cluster-scoped objects: unique per release *and* namespace, so that two parties'
releases of the same name in one cluster do not collide. */}}
{{- define "chaos.clusterScopedName" -}}
{{- printf "%s-%s" (include "chaos.fullname" .) .Release.Namespace | trunc 54 | trimSuffix "-" }}
{{- end }}

{{/* The rules of the operator's Role or ClusterRole (docs/operator.md, "Permissions it needs"). */}}
{{- define "chaos.rules" -}}
- apiGroups: [chaos.training.dev]
  resources: [chaosjobs]
  verbs: [get, list, watch, patch, delete]
- apiGroups: [chaos.training.dev]
  resources: [chaosjobs/status]
  verbs: [patch]
- apiGroups: [chaos.training.dev]
  resources: [chaosjobs/scale]
  verbs: [patch]
- apiGroups: [chaos.training.dev]
  resources: [chaosjobs/finalizers]
  verbs: [update]
- apiGroups: [chaos.training.dev]
  resources: [chaospeers]
  verbs: [get, list, watch]
- apiGroups: [chaos.training.dev]
  resources: [chaospeers/status]
  verbs: [patch]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [services]
  verbs: [create]
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [create]
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, create, update]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
- apiGroups: [""]
  resources: [resourcequotas]
  verbs: [list]
{{- end }}
