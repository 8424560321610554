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

{{/* config.admission.mode: webhook (default) or policy. */}}
{{- define "psi.mode" -}}
{{- (.Values.config.admission | default dict).mode | default "webhook" -}}
{{- end -}}

{{/* The namespaces served, as a namespaceSelector: config.namespaceSelector, and never the
     release namespace, kube-system or config.excludedNamespaces (the service refuses them too). */}}
{{- define "psi.namespaceSelector" -}}
{{- $excluded := concat (list .Release.Namespace "kube-system") (.Values.config.excludedNamespaces | default list) | uniq }}
{{- $selector := deepCopy .Values.config.namespaceSelector }}
{{- $expressions := concat ($selector.matchExpressions | default list) (list (dict "key" "kubernetes.io/metadata.name" "operator" "NotIn" "values" $excluded)) }}
{{- $_ := set $selector "matchExpressions" $expressions }}
{{- toYaml $selector }}
{{- end -}}

{{/* The audiences of the TokenRequests the service makes: one per registry whose source asks
     the API server (not a token file), each once, in config order; the same as
     Config::token_audiences (tests/install.rs compares them). Defaults as in src/sources. */}}
{{- define "psi.audiences" -}}
{{- $audiences := list -}}
{{- range .Values.config.registries -}}
{{- $audience := "" -}}
{{- $source := dict -}}
{{- if .kubernetes -}}
{{- $audience = .kubernetes.audience -}}
{{- else if .chainguard -}}
{{- $source = .chainguard -}}{{- $audience = .chainguard.audience | default "issuer.enforce.dev" -}}
{{- else if .quay -}}
{{- $source = .quay -}}{{- $audience = .quay.audience -}}
{{- else if .ecr -}}
{{- $source = .ecr -}}{{- $audience = .ecr.audience | default "sts.amazonaws.com" -}}
{{- else if .acr -}}
{{- $source = .acr -}}{{- $audience = .acr.audience | default "api://AzureADTokenExchange" -}}
{{- else if .gcp -}}
{{- $source = .gcp -}}{{- $audience = .gcp.audience | default (printf "https://iam.googleapis.com/%s" (trimPrefix "//iam.googleapis.com/" .gcp.workloadIdentityProvider)) -}}
{{- else if .tokenExchange -}}
{{- $source = .tokenExchange -}}{{- $audience = .tokenExchange.subjectTokenAudience -}}
{{- end -}}
{{- if and $audience (not ($source.serviceAccountToken | default dict).file) -}}
{{- $audiences = append $audiences $audience -}}
{{- end -}}
{{- end -}}
{{- $audiences | uniq | toJson -}}
{{- end -}}
