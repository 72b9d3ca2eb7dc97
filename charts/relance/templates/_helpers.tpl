{{/* Chart name. */}}
{{- define "relance.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Prefix of every resource name; short enough for "-recommendations" to fit in 63. */}}
{{- define "relance.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
What the chart knows of each service, in start order: its gRPC service (health checks
name it), who calls it over gRPC, whether it uses Redis, whether it scales on queue depth.
*/}}
{{- define "relance.catalog" -}}
profiles: {grpc: relance.v1.Profiles, callers: [campaigns, delivery], redis: false, queue: false}
events: {grpc: relance.v1.Events, callers: [], redis: false, queue: false}
segmentation: {grpc: relance.v1.Segments, callers: [campaigns], redis: true, queue: false}
recommendations: {grpc: relance.v1.Recommendations, callers: [delivery], redis: true, queue: false}
campaigns: {grpc: relance.v1.Campaigns, callers: [], redis: false, queue: true}
delivery: {grpc: relance.v1.Delivery, callers: [campaigns], redis: false, queue: true}
{{- end -}}

{{- define "relance.serviceNames" -}}
[profiles, events, segmentation, recommendations, campaigns, delivery]
{{- end -}}

{{/* Labels of every resource. */}}
{{- define "relance.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "relance.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: relance
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of a component: (dict "root" $ "component" "events"). */}}
{{- define "relance.selectorLabels" -}}
app.kubernetes.io/name: {{ include "relance.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The image reference. */}}
{{- define "relance.image" -}}
{{- $repo := required "image.repository is required" .Values.image.repository -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" $repo .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* An env var from a Secret: (dict "root" $ "env" "RELANCE_DATABASE_URL" "ref" .Values.secrets.databaseUrl). */}}
{{- define "relance.secretEnv" -}}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ required (printf "secrets: no Secret name for %s (set secrets.existingSecret)" .env) (default .root.Values.secrets.existingSecret .ref.name) }}
      key: {{ required (printf "secrets: no key for %s" .env) .ref.key }}
{{- end -}}

{{/* The public URL of delivery's tracking links. */}}
{{- define "relance.deliveryPublicUrl" -}}
{{- if .Values.services.delivery.publicUrl -}}
{{- .Values.services.delivery.publicUrl -}}
{{- else if and .Values.ingress.tracking.enabled .Values.ingress.tracking.host -}}
{{- printf "https://%s" .Values.ingress.tracking.host -}}
{{- end -}}
{{- end -}}

{{/* Whether training runs in CronJobs rather than in the recommendations replicas. */}}
{{- define "relance.trainingByCronJob" -}}
{{- if and .Values.training.workspaces (not .Values.training.keepInServiceTraining) -}}true{{- end -}}
{{- end -}}

{{/* The shared, non-secret settings (the ConfigMap's data; its checksum rolls the pods). */}}
{{- define "relance.configData" -}}
{{- $fullname := include "relance.fullname" . -}}
{{- $port := int .Values.ports.grpc -}}
RELANCE_GRPC_ADDR: {{ printf "0.0.0.0:%d" $port | quote }}
RELANCE_ADMIN_ADDR: {{ printf "0.0.0.0:%d" (int .Values.ports.admin) | quote }}
RELANCE_LOG_FORMAT: {{ .Values.settings.logFormat | quote }}
RELANCE_LOG_LEVEL: {{ .Values.settings.logLevel | quote }}
{{- with .Values.settings.otlpEndpoint }}
RELANCE_OTLP_ENDPOINT: {{ . | quote }}
{{- end }}
RELANCE_MIGRATE_ON_START: {{ ternary "false" "true" .Values.migrations.enabled | quote }}
RELANCE_SHUTDOWN_GRACE_SECS: {{ .Values.settings.shutdownGraceSecs | quote }}
RELANCE_DATABASE_MAX_CONNECTIONS: {{ .Values.settings.databaseMaxConnections | quote }}
RELANCE_REDIS_PREFIX: {{ .Values.settings.redisPrefix | quote }}
RELANCE_AMQP_PREFIX: {{ .Values.settings.amqpPrefix | quote }}
{{- range $service := list "profiles" "events" "segmentation" "recommendations" "delivery" }}
RELANCE_SERVICES__{{ upper $service }}: {{ printf "http://%s-%s:%d" $fullname $service $port | quote }}
{{- end }}
{{- range $name, $value := .Values.settings.extraEnv }}
{{ $name }}: {{ $value | toString | quote }}
{{- end }}
{{- end -}}

{{/* Volumes and mounts of the configuration file, when there is one. */}}
{{- define "relance.configFileVolume" -}}
{{- if .Values.configFile.existingSecret }}
- name: config
  secret:
    secretName: {{ .Values.configFile.existingSecret }}
    items:
      - key: {{ .Values.configFile.key }}
        path: relance.toml
{{- else if .Values.configFile.inline }}
- name: config
  configMap:
    name: {{ include "relance.fullname" . }}-file
{{- end }}
{{- end -}}

{{- define "relance.hasConfigFile" -}}
{{- if or .Values.configFile.existingSecret .Values.configFile.inline -}}true{{- end -}}
{{- end -}}

{{/* Pod-level fields shared by every pod: (dict "root" $ "spec" <service values or {}>). */}}
{{- define "relance.podCommon" -}}
{{- $root := .root -}}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $root.Values.serviceAccountName }}
serviceAccountName: {{ . }}
{{- end }}
automountServiceAccountToken: false
enableServiceLinks: false
securityContext:
  {{- toYaml $root.Values.podSecurityContext | nindent 2 }}
{{- with (default $root.Values.nodeSelector .spec.nodeSelector) }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (default $root.Values.tolerations .spec.tolerations) }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (default $root.Values.affinity .spec.affinity) }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Egress rules every Relance pod needs: DNS, Postgres, and (with "redis" "amqp") more. */}}
{{- define "relance.egressBase" -}}
{{- $np := .root.Values.networkPolicy -}}
- to:
    {{- required "networkPolicy.dns.to: give the DNS resolvers' peers" $np.dns.to | toYaml | nindent 4 }}
  ports:
    - {protocol: UDP, port: 53}
    - {protocol: TCP, port: 53}
{{- $backends := list "postgresql" -}}
{{- if .amqp }}{{ $backends = append $backends "rabbitmq" }}{{ end -}}
{{- if .redis }}{{ $backends = append $backends "redis" }}{{ end -}}
{{- range $backend := $backends }}
{{- $rule := index $np $backend }}
- to:
    {{- range $cidr := required (printf "networkPolicy.%s.cidrs: give where it answers" $backend) $rule.cidrs }}
    - ipBlock:
        cidr: {{ $cidr }}
    {{- end }}
  ports:
    {{- range $port := $rule.ports }}
    - {protocol: TCP, port: {{ $port }}}
    {{- end }}
{{- end }}
{{- if .root.Values.settings.otlpEndpoint }}
- to:
    {{- required "networkPolicy.otlp.to: give the OpenTelemetry collector's peers (settings.otlpEndpoint is set)" $np.otlp.to | toYaml | nindent 4 }}
  ports:
    {{- range $port := $np.otlp.ports }}
    - {protocol: TCP, port: {{ $port }}}
    {{- end }}
{{- end }}
{{- end -}}

{{/* The container security context and the /tmp mount every container gets. */}}
{{- define "relance.containerSecurity" -}}
securityContext:
  {{- toYaml .Values.securityContext | nindent 2 }}
{{- end -}}

{{/* Fails on settings that cannot work together. */}}
{{- define "relance.validate" -}}
{{- if and .Values.configFile.existingSecret .Values.configFile.inline -}}
{{- fail "configFile: set existingSecret or inline, not both (Relance reads one file)" -}}
{{- end -}}
{{- if and .Values.ingress.api.enabled (not .Values.ingress.api.host) -}}
{{- fail "ingress.api.host is required when ingress.api.enabled" -}}
{{- end -}}
{{- if and .Values.ingress.tracking.enabled (not .Values.ingress.tracking.host) -}}
{{- fail "ingress.tracking.host is required when ingress.tracking.enabled" -}}
{{- end -}}
{{- range $workspace := .Values.training.workspaces -}}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" (toString $workspace.name)) -}}
{{- fail (printf "training.workspaces: %q is not a workspace slug (lowercase letters, digits, -)" (toString $workspace.name)) -}}
{{- end -}}
{{- if gt (len (printf "%s-train-%s" (include "relance.fullname" $) $workspace.name)) 52 -}}
{{- fail (printf "training.workspaces: the CronJob name for %q is longer than 52 characters; shorten fullnameOverride" $workspace.name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
