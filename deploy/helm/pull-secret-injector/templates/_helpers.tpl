{{- define "psi.labels" -}}
app.kubernetes.io/name: {{ .Values.name }}
{{- end -}}

{{/* ServiceAccounts the kubernetes token source mints for: the only ones RBAC allows. */}}
{{- define "psi.tokenServiceAccounts" -}}
{{- $names := list -}}
{{- range .Values.config.registries -}}
{{- if .kubernetes -}}
{{- $names = append $names (default "default" .kubernetes.serviceAccount) -}}
{{- end -}}
{{- end -}}
{{- $names | uniq | toJson -}}
{{- end -}}
