{{/*
The namespace vireo-operator and vireo-agent keep their Leases in. The
binaries name it themselves (vireo_crds::labels::SYSTEM_NAMESPACE), so the
release must live there too.
*/}}
{{- define "vireo.systemNamespace" -}}vireo-system{{- end }}

{{- define "vireo.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
`<release>-<chart>`, or the release name alone when it already holds the
chart's name; at most 55 characters so that suffixes such as `-operator`
keep names within 63.
*/}}
{{- define "vireo.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 55 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 55 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 55 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "vireo.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every resource. */}}
{{- define "vireo.labels" -}}
helm.sh/chart: {{ include "vireo.chart" . }}
app.kubernetes.io/name: {{ include "vireo.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: vireo
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component: include with (list $ "operator"). */}}
{{- define "vireo.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "vireo.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* Labels of one component's resources: include with (list $ "agent"). */}}
{{- define "vireo.componentLabels" -}}
{{ include "vireo.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "vireo.operatorServiceAccount" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (printf "%s-operator" (include "vireo.fullname" .)) .Values.operator.serviceAccount.name }}
{{- else }}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "vireo.agentServiceAccount" -}}
{{- if .Values.agent.serviceAccount.create }}
{{- default (printf "%s-agent" (include "vireo.fullname" .)) .Values.agent.serviceAccount.name }}
{{- else }}
{{- required "agent.serviceAccount.name is required when agent.serviceAccount.create is false" .Values.agent.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image of a component: include with (list $ .Values.operator.image). */}}
{{- define "vireo.image" -}}
{{- $root := index . 0 }}
{{- $own := index . 1 }}
{{- $repo := default $root.Values.image.repository $own.repository }}
{{- $tag := default (default $root.Chart.AppVersion $root.Values.image.tag) $own.tag }}
{{- printf "%s:%s" $repo $tag }}
{{- end }}

{{/* Fails rendering when the release is not in the system namespace. */}}
{{- define "vireo.checkNamespace" -}}
{{- if ne .Release.Namespace (include "vireo.systemNamespace" .) }}
{{- fail (printf "install Vireo into the namespace %s (helm install -n %s --create-namespace): vireo-operator and vireo-agent keep their Leases there; this release is in %q" (include "vireo.systemNamespace" .) (include "vireo.systemNamespace" .) .Release.Namespace) }}
{{- end }}
{{- end }}
