{{/* Names and labels shared by every resource. */}}

{{- define "depn-serve.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release name alone when it already contains the chart's name (`helm install depn-serve ...`). */}}
{{- define "depn-serve.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* The labels selectors use: never change them on an installed release (selectors are immutable). */}}
{{- define "depn-serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "depn-serve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Every resource adds app.kubernetes.io/component after these. */}}
{{- define "depn-serve.labels" -}}
{{ include "depn-serve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{- define "depn-serve.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default (printf "%s-cuda" .Chart.AppVersion)) }}
{{- end }}

{{- define "depn-serve.tenantsConfigMap" -}}
{{- .Values.tenants.existingConfigMap | default (printf "%s-tenants" (include "depn-serve.fullname" .)) }}
{{- end }}

{{- define "depn-serve.adminTokenSecret" -}}
{{- .Values.adminToken.existingSecret | default (printf "%s-admin-token" (include "depn-serve.fullname" .)) }}
{{- end }}

{{- define "depn-serve.metricsTokenSecret" -}}
{{- .Values.metricsToken.existingSecret | default (printf "%s-metrics-token" (include "depn-serve.fullname" .)) }}
{{- end }}

{{- define "depn-serve.maskClaim" -}}
{{- .Values.maskStore.existingClaim | default (printf "%s-masks" (include "depn-serve.fullname" .)) }}
{{- end }}
