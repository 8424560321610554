{{- define "psi.labels" -}}
app.kubernetes.io/name: {{ .Values.name }}
{{- end -}}

{{/* The ServiceAccounts the TokenRequests are for (one Secret per namespace): each registry's
     whose source asks the API server (`kubernetes`, or `serviceAccountToken.fromNamespace`,
     default `default`), not those reading a token file; the only ones RBAC allows. The same as
     Config::token_service_accounts (tests/install.rs compares them). */}}
{{- define "psi.tokenServiceAccounts" -}}
{{- $names := list -}}
{{- range .Values.config.registries -}}
{{- if .kubernetes -}}
{{- $names = append $names (default "default" .kubernetes.serviceAccount) -}}
{{- else -}}
{{- range $source := list .chainguard .quay .ecr .gcp .acr .tokenExchange .artifactory .cloudsmith .artifactKeeper .dockerHub .alibaba .declarative -}}
{{- if $source -}}
{{- $token := $source.serviceAccountToken | default dict -}}
{{- if not $token.file -}}
{{- $names = append $names (default "default" ($token.fromNamespace | default dict).serviceAccount) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $names | uniq | toJson -}}
{{- end -}}

{{/* The longest lifetime a TokenRequest asks for, in seconds: the largest configured
     `expirationSeconds` (`kubernetes`: default 3600; `serviceAccountToken.fromNamespace`:
     default 600), 0 when no source asks the API server. The same as
     Config::max_token_seconds (tests/install.rs compares them). */}}
{{- define "psi.maxTokenSeconds" -}}
{{- $max := 0 -}}
{{- range .Values.config.registries -}}
{{- $seconds := 0 -}}
{{- if .kubernetes -}}
{{- $seconds = .kubernetes.expirationSeconds | default 3600 | int -}}
{{- else -}}
{{- range $source := list .chainguard .quay .ecr .gcp .acr .tokenExchange .artifactory .cloudsmith .artifactKeeper .dockerHub .alibaba .declarative -}}
{{- if $source -}}
{{- $token := $source.serviceAccountToken | default dict -}}
{{- if not $token.file -}}
{{- $seconds = ($token.fromNamespace | default dict).expirationSeconds | default 600 | int -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if gt $seconds $max -}}{{- $max = $seconds -}}{{- end -}}
{{- end -}}
{{- $max -}}
{{- end -}}

{{/* The namespaces the service serves, as CEL over the request's namespace and
     `variables.namespaceLabels` (the self-fencing policy): config.namespaceSelector, every
     operator of a LabelSelector, and never the release namespace, kube-system or
     config.excludedNamespaces; what NamespacePolicy::eligibility decides in the service
     (tests/install.rs checks both against the API server). */}}
{{- define "psi.optedIn" -}}
{{- $excluded := concat (list .Release.Namespace "kube-system") (.Values.config.excludedNamespaces | default list) | uniq -}}
{{- $terms := list (printf "!(request.namespace in %s)" (toJson $excluded)) -}}
{{- $labels := "variables.namespaceLabels" -}}
{{- range $key, $value := .Values.config.namespaceSelector.matchLabels | default dict -}}
{{- $terms = append $terms (printf "%s in %s && %s[%s] == %s" (toJson $key) $labels $labels (toJson $key) (toJson $value)) -}}
{{- end -}}
{{- range .Values.config.namespaceSelector.matchExpressions | default list -}}
{{- $key := toJson .key -}}
{{- if eq .operator "In" -}}
{{- $terms = append $terms (printf "(%s in %s && %s[%s] in %s)" $key $labels $labels $key (toJson .values)) -}}
{{- else if eq .operator "NotIn" -}}
{{- $terms = append $terms (printf "(!(%s in %s) || !(%s[%s] in %s))" $key $labels $labels $key (toJson .values)) -}}
{{- else if eq .operator "Exists" -}}
{{- $terms = append $terms (printf "%s in %s" $key $labels) -}}
{{- else if eq .operator "DoesNotExist" -}}
{{- $terms = append $terms (printf "!(%s in %s)" $key $labels) -}}
{{- else -}}
{{- fail (printf "config.namespaceSelector.matchExpressions: unknown operator %s" .operator) -}}
{{- end -}}
{{- end -}}
{{- join " &&\n" $terms -}}
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
{{- else if .artifactory -}}
{{- $source = .artifactory -}}{{- $audience = .artifactory.audience -}}
{{- else if .cloudsmith -}}
{{- $source = .cloudsmith -}}{{- $audience = .cloudsmith.audience -}}
{{- else if .artifactKeeper -}}
{{- $source = .artifactKeeper -}}{{- $audience = .artifactKeeper.audience -}}
{{- else if .dockerHub -}}
{{- $source = .dockerHub -}}{{- $audience = .dockerHub.audience | default "https://identity.docker.com" -}}
{{- else if .alibaba -}}
{{- $source = .alibaba -}}{{- $audience = .alibaba.audience | default "sts.aliyuncs.com" -}}
{{- else if .declarative -}}
{{- $source = .declarative -}}{{- $audience = .declarative.audience -}}
{{- end -}}
{{- if and $audience (not ($source.serviceAccountToken | default dict).file) -}}
{{- $audiences = append $audiences $audience -}}
{{- end -}}
{{- end -}}
{{- $audiences | uniq | toJson -}}
{{- end -}}

{{/* The service container's resources: .Values.resources when set, else sized from
     .Values.sizing (README, Sizing): memory 64 MiB plus 8 KiB per Secret kept (limit twice
     that, at least 256 MiB); CPU 50m plus 2.2 ms per renewal per second, renewals being
     secrets / (0.625 × lifetime) (limit twice that, at least one core). */}}
{{- define "psi.resources" -}}
{{- if .Values.resources -}}
{{- toYaml .Values.resources -}}
{{- else -}}
{{- $n := int .Values.sizing.secrets -}}
{{- $life := int .Values.sizing.tokenLifetimeSeconds -}}
{{- $memory := add 64 (div (add (mul $n 8) 1023) 1024) -}}
{{- $cpu := add 50 (div (add (mul $n 352) (sub (mul $life 100) 1)) (mul $life 100)) -}}
requests: {cpu: {{ $cpu }}m, memory: {{ $memory }}Mi}
limits: {cpu: {{ max 1000 (mul $cpu 2) }}m, memory: {{ max 256 (mul $memory 2) }}Mi}
{{- end -}}
{{- end -}}
