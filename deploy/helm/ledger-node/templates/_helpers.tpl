{{/* Names and labels shared by every manifest of the chart. */}}
{{- define "ledger.fullname" -}}
{{- if contains "ledger" .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-ledger" .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "ledger.labels" -}}
app.kubernetes.io/name: ledger-node
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component (api, consumer, ray-head, ray-shards, migrate, check, export). */}}
{{- define "ledger.selector" -}}
app.kubernetes.io/name: ledger-node
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "ledger.image" -}}
{{ printf "%s:%s" .Values.image.repository .Values.image.tag | quote }}
{{- end -}}

{{- define "ledger.raySvc" -}}
{{ include "ledger.fullname" . }}-head-svc
{{- end -}}

{{/* The pod template's `annotations:` block (nothing without Vault); `job`: the agent exits after rendering. */}}
{{- define "ledger.podAnnotationsBlock" -}}
{{- $annotations := include "ledger.podAnnotations" .root | trim -}}
{{- if $annotations }}
annotations:
  {{- $annotations | nindent 2 }}
  {{- if .job }}
  vault.hashicorp.com/agent-pre-populate-only: "true"
  {{- end }}
{{- end }}
{{- end -}}

{{/* Pod annotations: the Vault agent injector renders the secrets file (secrets.source=vault). */}}
{{- define "ledger.podAnnotations" -}}
{{- if eq .Values.secrets.source "vault" }}
vault.hashicorp.com/agent-inject: "true"
vault.hashicorp.com/role: {{ .Values.secrets.vault.role | quote }}
vault.hashicorp.com/agent-inject-secret-ledger.env: {{ .Values.secrets.vault.path | quote }}
vault.hashicorp.com/agent-inject-template-ledger.env: {{ .Values.secrets.vault.template | quote }}
{{- if .Values.hsm.enabled }}
vault.hashicorp.com/agent-inject-secret-pkcs11-pin: {{ .Values.secrets.vault.path | quote }}
vault.hashicorp.com/agent-inject-template-pkcs11-pin: {{ .Values.secrets.vault.pinTemplate | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Where the PKCS#11 PIN file is: the Vault agent's file or the mounted Kubernetes Secret key. */}}
{{- define "ledger.pinFile" -}}
{{- if eq .Values.secrets.source "vault" -}}
/vault/secrets/pkcs11-pin
{{- else -}}
/var/run/ledger/pkcs11/LEDGER_PKCS11_PIN
{{- end -}}
{{- end -}}

{{/* The container command (`run` is a shell line ending in `exec ...`): source the Vault-rendered
environment first when secrets come from Vault. */}}
{{- define "ledger.command" -}}
- /bin/sh
- -c
{{- if eq .root.Values.secrets.source "vault" }}
- {{ printf ". /vault/secrets/ledger.env && %s" .run | quote }}
{{- else }}
- {{ .run | quote }}
{{- end }}
{{- end -}}

{{/* Environment of every container running ledger-node: the ConfigMap and, with Kubernetes Secrets, the Secret. */}}
{{- define "ledger.envFrom" -}}
- configMapRef:
    name: {{ include "ledger.fullname" . }}-config
{{- if eq .Values.secrets.source "kubernetes" }}
- secretRef:
    name: {{ .Values.secrets.existingSecret }}
{{- end }}
{{- end -}}

{{/* Volumes for the PKCS#11 PIN (Kubernetes Secret) and the HSM client configuration. */}}
{{- define "ledger.hsmVolumes" -}}
{{- if and .Values.hsm.enabled (eq .Values.secrets.source "kubernetes") }}
- name: pkcs11-pin
  secret:
    secretName: {{ .Values.secrets.existingSecret }}
    items:
      - key: LEDGER_PKCS11_PIN
        path: LEDGER_PKCS11_PIN
{{- end }}
{{- if and .Values.hsm.enabled .Values.hsm.configMap }}
- name: hsm-config
  configMap:
    name: {{ .Values.hsm.configMap }}
{{- end }}
{{- end -}}

{{- define "ledger.hsmMounts" -}}
{{- if and .Values.hsm.enabled (eq .Values.secrets.source "kubernetes") }}
- name: pkcs11-pin
  mountPath: /var/run/ledger/pkcs11
  readOnly: true
{{- end }}
{{- if and .Values.hsm.enabled .Values.hsm.configMap }}
- name: hsm-config
  mountPath: /opt/hsm-config
  readOnly: true
{{- end }}
{{- end -}}

{{- define "ledger.securityContext" -}}
allowPrivilegeEscalation: false
runAsNonRoot: true
runAsUser: 1000
capabilities:
  drop: ["ALL"]
{{- end -}}
