{{/* Names and labels. */}}
{{- define "tiffin.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tiffin.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tiffin.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "tiffin.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels; "component" is api or gpu. */}}
{{- define "tiffin.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tiffin.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "tiffin.secretName" -}}
{{- default (include "tiffin.fullname" .) .Values.secret.existingSecret -}}
{{- end -}}

{{/* TIFFIN_OVERRIDES: the values' overrides, then the server settings the pod spec relies on:
the timeouts behind its grace period, the gRPC port it exposes, and the address gRPC binds
(server.host, 127.0.0.1 in env=dev). */}}
{{- define "tiffin.overrides" -}}
{{- $server := .root.Values.server -}}
{{- $all := concat .root.Values.tiffin.overrides .extra (list (printf "server.drain_timeout_s=%v" $server.drainTimeoutSeconds) (printf "server.graceful_timeout_s=%v" $server.gracefulTimeoutSeconds) (printf "server.grpc_port=%v" $server.grpcPort) "server.host=0.0.0.0") -}}
{{- join " " $all -}}
{{- end -}}

{{/* The pod spec of a Tiffin Deployment. Arguments: root, component, image, extra overrides,
resources, nodeSelector, tolerations, affinity, gpus (0: none). */}}
{{- define "tiffin.podSpec" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- if le (float64 $v.terminationGracePeriodSeconds) (float64 $v.server.drainTimeoutSeconds) -}}
{{- fail "terminationGracePeriodSeconds must exceed server.drainTimeoutSeconds" -}}
{{- end -}}
{{- with $v.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds }}
securityContext:
  {{- toYaml $v.podSecurityContext | nindent 2 }}
containers:
  - name: tiffin
    image: {{ printf "%s:%s" .image.repository .image.tag | quote }}
    imagePullPolicy: {{ $v.image.pullPolicy }}
    ports:
      - {name: http, containerPort: {{ $v.server.httpPort }}, protocol: TCP}
      - {name: grpc, containerPort: {{ $v.server.grpcPort }}, protocol: TCP}
    env:
      - name: TIFFIN_ENV
        valueFrom: {configMapKeyRef: {name: {{ include "tiffin.fullname" $root }}, key: TIFFIN_ENV}}
      - name: TIFFIN_OVERRIDES
        valueFrom: {configMapKeyRef: {name: {{ include "tiffin.fullname" $root }}, key: {{ printf "TIFFIN_OVERRIDES_%s" (upper .component) }}}}
      {{- if $v.config }}
      - name: TIFFIN_CONFIG
        value: /etc/tiffin/config.yaml
      - name: TIFFIN_CONFIG_WATCH_S
        value: {{ $v.configWatchSeconds | toString | quote }}
      {{- end }}
      {{- range $name, $value := $v.env }}
      - name: {{ $name }}
        value: {{ $value | toString | quote }}
      {{- end }}
    envFrom:
      - secretRef:
          name: {{ include "tiffin.secretName" $root }}
    readinessProbe:
      httpGet: {path: {{ $v.probes.readiness.path }}, port: http}
      periodSeconds: {{ $v.probes.readiness.periodSeconds }}
      failureThreshold: {{ $v.probes.readiness.failureThreshold }}
    livenessProbe:
      httpGet: {path: {{ $v.probes.liveness.path }}, port: http}
      periodSeconds: {{ $v.probes.liveness.periodSeconds }}
      failureThreshold: {{ $v.probes.liveness.failureThreshold }}
    startupProbe:
      httpGet: {path: {{ $v.probes.startup.path }}, port: http}
      periodSeconds: {{ $v.probes.startup.periodSeconds }}
      failureThreshold: {{ $v.probes.startup.failureThreshold }}
    resources:
      {{- $resources := deepCopy .resources -}}
      {{- if gt (int .gpus) 0 -}}
      {{- $_ := set $resources "limits" (merge (dict "nvidia.com/gpu" (int .gpus)) (default (dict) $resources.limits)) -}}
      {{- end }}
      {{- toYaml $resources | nindent 6 }}
    securityContext:
      {{- toYaml $v.securityContext | nindent 6 }}
    {{- if $v.config }}
    volumeMounts:
      - {name: config, mountPath: /etc/tiffin, readOnly: true}
    {{- end }}
{{- if $v.config }}
volumes:
  - name: config
    configMap:
      name: {{ include "tiffin.fullname" $root }}-config
      items: [{key: config.yaml, path: config.yaml}]
{{- end }}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/*
The parts of `config` that only a restart changes (runtime/config_changes.py): a change there
rolls the pods (checksum/config-restart); any other change is applied by the running pods.
Whole sections where only some keys need a restart (server, handlers), to be safe.
*/}}
{{- define "tiffin.restartConfig" -}}
{{- $c := fromYaml .Values.config -}}
{{- $restart := pick $c "server" "serving" "transports" "graphql" "plugins" "load_entrypoint_plugins" "handlers" "batch" -}}
{{- $_ := set $restart "telemetry" (pick (default (dict) $c.telemetry) "metrics" "sample_interval_s") -}}
{{- $_ := set $restart "logging" (pick (default (dict) $c.logging) "access_log") -}}
{{- toYaml $restart -}}
{{- end }}
