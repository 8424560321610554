{{- define "ts.labels" -}}
app.kubernetes.io/name: pull-secret-injector-token-server
{{- end -}}
