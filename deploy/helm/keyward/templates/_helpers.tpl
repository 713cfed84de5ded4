{{/* Names and labels. */}}
{{- define "keyward.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "keyward.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "keyward.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "keyward.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "keyward.selectorLabels" -}}
app.kubernetes.io/name: {{ include "keyward.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "keyward.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "keyward.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
keyward.io/region: {{ .Values.region | quote }}
{{- end }}

{{/* Where the pod sees its files. keyward.yaml names these paths; the Deployment mounts there. */}}
{{- define "keyward.configDir" -}}/etc/keyward/config{{- end }}
{{- define "keyward.tableDir" -}}/etc/keyward/table{{- end }}
{{- define "keyward.adminDir" -}}/etc/keyward/admin{{- end }}
{{- define "keyward.listenTlsDir" -}}/etc/keyward/tls/listen{{- end }}
{{- define "keyward.clusterDir" -}}/etc/keyward/clusters{{- end }}

{{/* A cluster name as part of a volume name (a DNS label). */}}
{{- define "keyward.volumeSuffix" -}}
{{- regexReplaceAll "[^a-z0-9-]" (lower .) "-" | trunc 40 | trimSuffix "-" }}
{{- end }}

{{- define "keyward.adminTokenSecret" -}}
{{- .Values.admin.tokenSecret | default (printf "%s-admin-token" (include "keyward.fullname" .)) }}
{{- end }}

{{- define "keyward.tableConfigMap" -}}
{{- .Values.ownershipConfigMap | default (printf "%s-table" (include "keyward.fullname" .)) }}
{{- end }}

{{- define "keyward.advertisedHost" -}}
{{- .Values.listen.advertisedHost | default (printf "%s.%s.svc.cluster.local" (include "keyward.fullname" .) .Release.Namespace) }}
{{- end }}

{{/* The clusters in keyward's id order, as JSON: this region's first, then the others by name
     (src/proxy/brokers.rs). */}}
{{- define "keyward.clusterOrder" -}}
{{- if not (hasKey .Values.clusters .Values.region) }}
{{- fail (printf "region %q has no entry in clusters" .Values.region) }}
{{- end }}
{{- $others := without (keys .Values.clusters | sortAlpha) .Values.region }}
{{- prepend $others .Values.region | toJson }}
{{- end }}

{{/* One port per broker of every cluster, as JSON [{name, port}]: node N of the c-th cluster is
     virtual node c * portsPerCluster + N at brokerPortBase + that (keyward.yaml's listen). */}}
{{- define "keyward.brokerPorts" -}}
{{- $per := int .Values.listen.portsPerCluster }}
{{- $base := int .Values.listen.brokerPortBase }}
{{- $ports := list }}
{{- range $c, $name := include "keyward.clusterOrder" . | fromJsonArray }}
{{- range $node := get (get $.Values.clusters $name) "brokers" | default list }}
{{- if or (lt (int $node) 0) (ge (int $node) $per) }}
{{- fail (printf "clusters.%s.brokers: node id %v must be 0-%d (listen.portsPerCluster)" $name $node (sub $per 1)) }}
{{- end }}
{{- $virtual := add (mul $c $per) (int $node) }}
{{- $ports = append $ports (dict "name" (printf "broker-%d" $virtual) "port" (add $base $virtual)) }}
{{- end }}
{{- end }}
{{- toJson $ports }}
{{- end }}

{{/* keyward.yaml. */}}
{{- define "keyward.config" -}}
{{- $listen := dict
      "bootstrap" (printf "0.0.0.0:%d" (int .Values.listen.bootstrapPort))
      "advertised_host" (include "keyward.advertisedHost" .)
      "broker_port_base" (int .Values.listen.brokerPortBase)
      "ports_per_cluster" (int .Values.listen.portsPerCluster) }}
{{- with .Values.listen.tls }}
{{- if .secretName }}
{{- $tls := dict
      "cert" (printf "%s/tls.crt" (include "keyward.listenTlsDir" $))
      "key" (printf "%s/tls.key" (include "keyward.listenTlsDir" $))
      "min_version" (toString .minVersion) }}
{{- if .clientCa }}
{{- $_ := set $tls "client_ca" (printf "%s/ca.crt" (include "keyward.listenTlsDir" $)) }}
{{- end }}
{{- $_ := set $listen "tls" $tls }}
{{- end }}
{{- end }}
{{- $clusters := dict }}
{{- range $name, $c := .Values.clusters }}
{{- $dir := printf "%s/%s" (include "keyward.clusterDir" $) $name }}
{{- $out := dict "bootstrap" (required (printf "clusters.%s.bootstrap: the cluster's bootstrap servers" $name) (get $c "bootstrap")) }}
{{- if hasKey $c "tls" }}
{{- $tls := dict }}
{{- if get ($c.tls | default dict) "secretName" }}
{{- $_ := set $tls "ca" (printf "%s/tls/ca.crt" $dir) }}
{{- if get $c.tls "clientCert" }}
{{- $_ := set $tls "cert" (printf "%s/tls/tls.crt" $dir) }}
{{- $_ := set $tls "key" (printf "%s/tls/tls.key" $dir) }}
{{- end }}
{{- end }}
{{- $_ := set $out "tls" $tls }}
{{- end }}
{{- with get $c "sasl" }}
{{- $_ := set $out "sasl" (dict
      "mechanism" (required (printf "clusters.%s.sasl.mechanism" $name) (get . "mechanism"))
      "username" (required (printf "clusters.%s.sasl.username" $name) (get . "username"))
      "password_file" (printf "%s/sasl/password" $dir)) }}
{{- end }}
{{- with get $c "clientAuth" }}
{{- $_ := set $out "client_auth" . }}
{{- end }}
{{- $_ := set $clusters $name $out }}
{{- end }}
{{- $config := dict
      "region" .Values.region
      "listen" $listen
      "admin" (dict "listen" (printf "0.0.0.0:%d" (int .Values.admin.port)) "reload_token_file" (printf "%s/token" (include "keyward.adminDir" .)))
      "clusters" $clusters
      "ownership_file" (printf "%s/ownership.yaml" (include "keyward.tableDir" .)) }}
{{- with .Values.reads }}{{ $_ := set $config "reads" . }}{{ end }}
{{- with .Values.limits }}{{ $_ := set $config "limits" . }}{{ end }}
{{- if kindIs "map" .Values.replication }}{{ $_ := set $config "replication" .Values.replication }}{{ end }}
{{- toYaml $config }}
{{- end }}
