#!/usr/bin/env bash
# Installs isthmus into N Kubernetes clusters that form one mesh, and removes it again.
#
#   deploy/multicluster.sh up   --root DIR --cluster NAME=KUBECONFIG[:NETWORK] ... [options]
#   deploy/multicluster.sh down --root DIR --cluster NAME=KUBECONFIG[:NETWORK] ...
#
# NAME is the cluster's id in the mesh (a DNS label), KUBECONFIG a kubeconfig of an
# administrator of that cluster (its current context is used), NETWORK the cluster's
# network (a DNS label; by default the cluster's own name: every cluster its own network).
# DIR holds the mesh root (created by the first `up` unless it is there) and one
# intermediate per cluster, in Istio's cacerts layout (`isthmusctl ca init`).
#
# `up`, per cluster:
#   1. an intermediate DIR/NAME signed by the root, unless DIR/NAME already has one;
#   2. deploy/kubernetes rendered with the cluster's values (ConfigMap isthmus-cluster:
#      cluster and network; the image tag) plus Secret isthmus-system/cacerts from DIR/NAME
#      and the gateway's one-time bootstrap token (Secret isthmus-eastwestgateway-token,
#      only when the cluster has none), compared with what is there (`kubectl diff
#      --server-side`) and applied with server-side apply (field manager
#      isthmus-multicluster) when anything differs;
#   3. a remote-cluster Secret for every other cluster (`isthmusctl cluster secret`, which
#      installs the reader role in that cluster and mints its token), unless the cluster
#      already has one for it;
#   4. then it waits (--wait, 5m by default; --no-wait skips this) until every registry
#      reports every cluster synced (`isthmusctl clusters` through `kubectl port-forward`
#      to the registry's admin port), and prints what to check.
# A second `up` with the same arguments changes nothing: the intermediates, tokens and
# remote secrets are not minted again and the rendered objects are already as written.
#
# `down` removes, in every cluster, exactly what `up` installed (everything it writes is
# labelled app.kubernetes.io/managed-by=isthmus-multicluster), including the Network CRD
# (and with it any Network objects) and the isthmus-system namespace; DIR is left alone.
#
# Every argument and every cluster is checked before anything is changed: a missing or
# unreadable kubeconfig, a cluster that does not answer or where the kubeconfig's user is
# not an administrator, a name or network that is not a DNS label, a name or an API server
# given twice.
#
# Options:
#   --trust-domain TD   the mesh's trust domain for a new root (default cluster.local)
#   --tag TAG           the images' tag (default: the workspace version in Cargo.toml)
#   --wait DURATION     how long to wait for the registries (90s, 5m, 1h; default 5m)
#   --no-wait           do not wait (without nodes, no registry pod ever runs)
#
# Needs kubectl (with its built-in kustomize) and isthmusctl on PATH, or named by the
# KUBECTL and ISTHMUSCTL environment variables, and diff(1) for `kubectl diff`.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
manifests="$here/kubernetes"
kubectl_bin=${KUBECTL:-kubectl}
isthmusctl_bin=${ISTHMUSCTL:-isthmusctl}

readonly SYSTEM_NAMESPACE=isthmus-system
readonly FIELD_MANAGER=isthmus-multicluster
readonly MANAGED_BY=app.kubernetes.io/managed-by=isthmus-multicluster
readonly GATEWAY_ACCOUNT=isthmus-eastwestgateway
readonly GATEWAY_TOKEN_SECRET=isthmus-eastwestgateway-token
readonly REMOTE_SECRET_PREFIX=istio-remote-secret-
# How long one request to an API server may take during the checks.
readonly REQUEST_TIMEOUT=15s
# Between two looks at the registries while waiting.
readonly WAIT_POLL_SECONDS=5

say() { printf '%s\n' "$*"; }
die() {
  printf 'multicluster.sh: %s\n' "$*" >&2
  exit 1
}
usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
  exit 2
}

# --- arguments -----------------------------------------------------------------------

[ $# -ge 1 ] || usage
command=$1
shift
case $command in
up | down) ;;
-h | --help | help) usage ;;
*) die "unknown command '$command': use up or down" ;;
esac

root=""
trust_domain=cluster.local
tag=""
wait_spec=5m
wait_enabled=1
names=()
kubeconfigs=()
networks=()

need_value() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value"; }

while [ $# -gt 0 ]; do
  case $1 in
  --root)
    need_value "$@"
    root=$2
    shift 2
    ;;
  --cluster)
    need_value "$@"
    spec=$2
    shift 2
    name=${spec%%=*}
    [ "$name" != "$spec" ] && [ -n "$name" ] || die "--cluster $spec: expected NAME=KUBECONFIG[:NETWORK]"
    rest=${spec#*=}
    network=$name
    # KUBECONFIG:NETWORK, unless the whole is a file (a path may hold a colon).
    if [ ! -e "$rest" ] && [[ $rest == *:* ]]; then
      network=${rest##*:}
      rest=${rest%:*}
    fi
    [ -n "$rest" ] || die "--cluster $spec: no kubeconfig"
    names+=("$name")
    kubeconfigs+=("$rest")
    networks+=("$network")
    ;;
  --trust-domain)
    need_value "$@"
    trust_domain=$2
    shift 2
    ;;
  --tag)
    need_value "$@"
    tag=$2
    shift 2
    ;;
  --wait)
    need_value "$@"
    wait_spec=$2
    shift 2
    ;;
  --no-wait)
    wait_enabled=0
    shift
    ;;
  -h | --help) usage ;;
  *) die "unknown argument '$1' (see --help)" ;;
  esac
done

[ -n "$root" ] || die "--root DIR is required (the mesh root and the clusters' intermediates)"
[ ${#names[@]} -gt 0 ] || die "no --cluster NAME=KUBECONFIG[:NETWORK] given"

# Seconds in a duration written as 90, 90s, 5m or 1h.
duration_seconds() {
  case $1 in
  *[!0-9smh]* | "" | [smh]*) return 1 ;;
  *s) [[ ${1%s} =~ ^[0-9]+$ ]] && echo "${1%s}" ;;
  *m) [[ ${1%m} =~ ^[0-9]+$ ]] && echo $((${1%m} * 60)) ;;
  *h) [[ ${1%h} =~ ^[0-9]+$ ]] && echo $((${1%h} * 3600)) ;;
  *) [[ $1 =~ ^[0-9]+$ ]] && echo "$1" ;;
  esac
}
wait_seconds=$(duration_seconds "$wait_spec") ||
  die "--wait $wait_spec: not a duration (write 90s, 5m or 1h)"

is_dns_label() { [[ ${#1} -le 63 && $1 =~ ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$ ]]; }

if [ -z "$tag" ]; then
  tag=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$here/../Cargo.toml" | head -n1)
  [ -n "$tag" ] || die "cannot read the workspace version from Cargo.toml: pass --tag"
fi

# --- checks, before anything changes ---------------------------------------------------

command -v "$kubectl_bin" >/dev/null 2>&1 || die "kubectl not found ('$kubectl_bin'): put it on PATH or set KUBECTL"
command -v "$isthmusctl_bin" >/dev/null 2>&1 || die "isthmusctl not found ('$isthmusctl_bin'): put it on PATH or set ISTHMUSCTL"
[ "$command" = down ] || command -v diff >/dev/null 2>&1 || die "diff(1) not found: kubectl diff needs it"

work=$(mktemp -d "${TMPDIR:-/tmp}/isthmus-multicluster.XXXXXX")
forwards=()
cleanup() {
  local pid
  for pid in "${forwards[@]}"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

# kube I ARGS...: kubectl against cluster I (its index), with a private discovery cache.
kube() {
  local i=$1
  shift
  "$kubectl_bin" --kubeconfig "${kubeconfigs[$i]}" --cache-dir "$work/cache-$i" "$@"
}

problems=()
servers=()
for i in "${!names[@]}"; do
  name=${names[$i]}
  kc=${kubeconfigs[$i]}
  is_dns_label "$name" || problems+=("cluster name '$name' is not a DNS label (lower-case letters, digits, '-')")
  is_dns_label "${networks[$i]}" || problems+=("cluster $name: network '${networks[$i]}' is not a DNS label")
  for j in "${!names[@]}"; do
    if [ "$j" -lt "$i" ] && [ "${names[$j]}" = "$name" ]; then
      problems+=("cluster name '$name' is given twice")
    fi
  done
  if [ ! -f "$kc" ] || [ ! -r "$kc" ]; then
    problems+=("cluster $name: kubeconfig $kc does not exist or is not readable")
    servers+=("")
    continue
  fi
  server=$(kube "$i" config view --minify -o 'jsonpath={.clusters[0].cluster.server}' 2>&1) ||
    {
      problems+=("cluster $name: kubeconfig $kc: ${server//$'\n'/ }")
      servers+=("")
      continue
    }
  servers+=("$server")
  for j in "${!names[@]}"; do
    if [ "$j" -lt "$i" ] && [ -n "$server" ] && [ "${servers[$j]}" = "$server" ]; then
      problems+=("clusters ${names[$j]} and $name have the same API server $server")
    fi
  done
  if ! out=$(kube "$i" --request-timeout="$REQUEST_TIMEOUT" get --raw=/readyz 2>&1); then
    problems+=("cluster $name: API server $server does not answer: ${out//$'\n'/ }")
    continue
  fi
  if ! out=$(kube "$i" --request-timeout="$REQUEST_TIMEOUT" auth can-i '*' '*' --all-namespaces 2>&1) || [ "$out" != yes ]; then
    problems+=("cluster $name: the user of $kc is not a cluster administrator (kubectl auth can-i '*' '*' says: ${out//$'\n'/ })")
    continue
  fi
  if [ "$command" = up ]; then
    out=$(kube "$i" get namespace "$SYSTEM_NAMESPACE" --ignore-not-found \
      -o 'jsonpath={.metadata.deletionTimestamp}' 2>&1) ||
      problems+=("cluster $name: cannot read namespace $SYSTEM_NAMESPACE: ${out//$'\n'/ }")
    [ -z "$out" ] ||
      problems+=("cluster $name: namespace $SYSTEM_NAMESPACE is being deleted (since $out, by an earlier down?): wait until it is gone")
  fi
done

if [ "$command" = up ]; then
  if [ -e "$root" ] && [ ! -d "$root" ]; then
    problems+=("--root $root is not a directory")
  elif [ ! -f "$root/root-cert.pem" ]; then
    for name in "${names[@]}"; do
      [ ! -f "$root/$name/ca-cert.pem" ] ||
        problems+=("$root/$name has an intermediate but $root has no root-cert.pem: a new root would not have signed it")
    done
  fi
fi

if [ ${#problems[@]} -gt 0 ]; then
  printf 'multicluster.sh: nothing was changed:\n' >&2
  printf '  %s\n' "${problems[@]}" >&2
  exit 1
fi

# --- up ----------------------------------------------------------------------------------

# The clusters' intermediates that are missing, in one call so that a new root signs all.
ensure_intermediates() {
  local missing=() name
  for name in "${names[@]}"; do
    [ -f "$root/$name/ca-cert.pem" ] || missing+=(--cluster "$name")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    say "mesh CA: root and intermediates in $root kept"
    return
  fi
  "$isthmusctl_bin" ca init --trust-domain "$trust_domain" --out "$root" "${missing[@]}" |
    sed 's/^/mesh CA: /'
}

# exists I KIND NAME: whether cluster I has KIND NAME in the system namespace.
exists() {
  local out
  out=$(kube "$1" get "$2" "$3" -n "$SYSTEM_NAMESPACE" --ignore-not-found -o name 2>&1) ||
    die "cluster ${names[$1]}: cannot read $2 $3: $out"
  [ -n "$out" ]
}

# exists_namespace I: whether cluster I has the system namespace.
exists_namespace() {
  local out
  out=$(kube "$1" get namespace "$SYSTEM_NAMESPACE" --ignore-not-found -o name 2>&1) ||
    die "cluster ${names[$1]}: cannot read namespace $SYSTEM_NAMESPACE: $out"
  [ -n "$out" ]
}

# render I: writes cluster I's overlay and prints the objects it renders to.
render() {
  local i=$1 name=${names[$1]} dir="$work/overlay-$1"
  mkdir -p "$dir"
  cp "$root/$name/ca-cert.pem" "$root/$name/ca-key.pem" "$root/$name/cert-chain.pem" \
    "$root/$name/root-cert.pem" "$dir/"
  local token_generator=""
  if ! exists "$i" secret "$GATEWAY_TOKEN_SECRET"; then
    local token
    token=$("$isthmusctl_bin" token create --ca-dir "$root/$name" \
      --namespace "$SYSTEM_NAMESPACE" --service-account "$GATEWAY_ACCOUNT") ||
      die "cluster $name: cannot create the gateway's bootstrap token"
    printf '%s' "$token" >"$dir/gateway-token"
    token_generator="- name: $GATEWAY_TOKEN_SECRET
  namespace: $SYSTEM_NAMESPACE
  options:
    disableNameSuffixHash: true
  files:
  - token=gateway-token"
  fi
  cat >"$dir/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
- $(realpath --relative-to="$dir" "$manifests")
labels:
- pairs:
    ${MANAGED_BY%%=*}: ${MANAGED_BY#*=}
configMapGenerator:
- name: isthmus-cluster
  namespace: $SYSTEM_NAMESPACE
  behavior: replace
  literals:
  - cluster=$name
  - network=${networks[$i]}
secretGenerator:
- name: cacerts
  namespace: $SYSTEM_NAMESPACE
  options:
    disableNameSuffixHash: true
  files:
  - ca-cert.pem
  - ca-key.pem
  - cert-chain.pem
  - root-cert.pem
$token_generator
images:
- name: isthmus/registry
  newTag: "$tag"
- name: isthmus/gateway
  newTag: "$tag"
EOF
  kube "$i" kustomize "$dir"
}

# install I: applies cluster I's rendered objects when they differ from the cluster's.
install() {
  local i=$1 name=${names[$1]} objects="$work/objects-$1.yaml" status=0 out
  render "$i" >"$objects"
  # A first install has nothing to compare with (and the namespaced objects' namespace
  # does not exist yet for the comparison's dry run).
  if exists_namespace "$i"; then
    out=$(kube "$i" diff --server-side --field-manager="$FIELD_MANAGER" -f "$objects" 2>&1) || status=$?
  else
    status=1
  fi
  case $status in
  0)
    say "cluster $name: unchanged ($(grep -c '^kind:' "$objects") objects as written)"
    return
    ;;
  1) ;;
  *) die "cluster $name: kubectl diff failed: $out" ;;
  esac
  # kustomize orders the Namespace and the CRDs first, so the rest finds them.
  out=$(kube "$i" apply --server-side --field-manager="$FIELD_MANAGER" -f "$objects" 2>&1) ||
    die "cluster $name: apply refused: $out"
  say "cluster $name: applied"
  printf '%s\n' "$out" | sed "s/^/  /"
}

# remote_secrets I: a remote-cluster Secret in cluster I for every other cluster.
remote_secrets() {
  local i=$1 j secret out
  for j in "${!names[@]}"; do
    [ "$j" != "$i" ] || continue
    secret="$REMOTE_SECRET_PREFIX${names[$j]}"
    if exists "$i" secret "$secret"; then
      say "cluster ${names[$i]}: remote secret for ${names[$j]} kept"
      continue
    fi
    "$isthmusctl_bin" cluster secret --kubeconfig "${kubeconfigs[$j]}" --name "${names[$j]}" \
      --network "${networks[$j]}" --namespace "$SYSTEM_NAMESPACE" >"$work/$secret-$i.yaml" \
      2>"$work/$secret-$i.err" ||
      die "cluster ${names[$j]}: isthmusctl cluster secret failed: $(cat "$work/$secret-$i.err")"
    out=$(kube "$i" label --local -f "$work/$secret-$i.yaml" "$MANAGED_BY" -o yaml |
      kube "$i" apply --server-side --field-manager="$FIELD_MANAGER" -f - 2>&1) ||
      die "cluster ${names[$i]}: remote secret for ${names[$j]} refused: $out"
    say "cluster ${names[$i]}: remote secret for ${names[$j]} installed ($out)"
  done
}

# pods_report I: why cluster I's registry is not ready, one line per pod.
pods_report() {
  local i=$1 name=${names[$1]} rows
  rows=$(kube "$i" get pods -n "$SYSTEM_NAMESPACE" -l app=isthmus-registry -o \
    'jsonpath={range .items[*]}{.metadata.name}{"|"}{.status.phase}{"|"}{.spec.nodeName}{"|"}{.status.conditions[?(@.type=="PodScheduled")].reason}{"|"}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' 2>&1) ||
    {
      say "cluster $name: cannot list the registry's pods: $rows"
      return
    }
  if [ -z "$rows" ]; then
    say "cluster $name: no pod of deployment $SYSTEM_NAMESPACE/isthmus-registry exists (no controller has created one: is the cluster's controller manager running?)"
    return
  fi
  local pod phase node reason ready
  # '|', not a tab: read collapses runs of whitespace separators, losing empty fields.
  while IFS='|' read -r pod phase node reason ready; do
    if [ -z "$node" ]; then
      say "cluster $name: pod $SYSTEM_NAMESPACE/$pod is not scheduled to any node (phase ${phase:-unknown}${reason:+, $reason}): does the cluster have nodes that can run it?"
    elif [ "$ready" != True ]; then
      say "cluster $name: pod $SYSTEM_NAMESPACE/$pod on node $node is not ready (phase ${phase:-unknown})"
    fi
  done <<<"$rows"
}

# registry_ready I: whether cluster I has a ready registry pod.
registry_ready() {
  local ready
  ready=$(kube "$1" get pods -n "$SYSTEM_NAMESPACE" -l app=isthmus-registry -o \
    'jsonpath={range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' 2>/dev/null) ||
    return 1
  grep -qx True <<<"$ready"
}

# forward I: starts a port-forward to cluster I's registry admin port and sets
# forward_port to its local port. Runs in this shell (not in a command substitution), so
# that the EXIT trap knows the port-forward's PID and stops it.
# The admin serves /debug/* to loopback only, and a port-forward arrives on the pod's
# loopback, where the API server's service proxy would not.
forward() {
  local i=$1 log="$work/forward-$1.log" n
  forward_port=""
  "$kubectl_bin" --kubeconfig "${kubeconfigs[$i]}" --cache-dir "$work/cache-$i" \
    port-forward -n "$SYSTEM_NAMESPACE" deploy/isthmus-registry :15014 >"$log" 2>&1 &
  forwards+=($!)
  for n in $(seq 1 50); do
    forward_port=$(sed -n 's/^Forwarding from 127.0.0.1:\([0-9]*\) .*/\1/p' "$log" | head -n1)
    [ -z "$forward_port" ] || return 0
    sleep 0.2
  done
  return 1
}

# unsynced I PORT: the clusters cluster I's registry does not report synced, one a line.
unsynced() {
  local table name
  table=$("$isthmusctl_bin" clusters --admin "127.0.0.1:$2" 2>&1) || {
    echo "(registry of ${names[$1]} does not answer: $table)"
    return
  }
  for name in "${names[@]}"; do
    # The table's rows end at the first blank line; the details follow.
    awk -v c="$name" 'NR > 1 && NF == 0 { exit } NR > 1 && $1 == c && $3 == "synced" { found = 1 } END { exit !found }' \
      <<<"$table" || echo "$name"
  done
}

wait_synced() {
  local deadline=$((SECONDS + wait_seconds)) i pending lag
  declare -A ports=()
  say "waiting up to $wait_spec until every registry reports every cluster synced"
  while :; do
    pending=()
    for i in "${!names[@]}"; do
      if ! registry_ready "$i"; then
        pending+=("$i")
        continue
      fi
      if [ -z "${ports[$i]:-}" ]; then
        forward "$i" || {
          pending+=("$i")
          continue
        }
        ports[$i]=$forward_port
      fi
      lag=$(unsynced "$i" "${ports[$i]}")
      [ -z "$lag" ] || pending+=("$i")
    done
    [ ${#pending[@]} -gt 0 ] || break
    if [ $SECONDS -ge $deadline ]; then
      printf 'multicluster.sh: not every registry reports every cluster synced after %s:\n' "$wait_spec" >&2
      for i in "${pending[@]}"; do
        if ! registry_ready "$i"; then
          pods_report "$i" >&2
        elif [ -n "${ports[$i]:-}" ]; then
          printf 'cluster %s: its registry does not report synced: %s\n' "${names[$i]}" \
            "$(unsynced "$i" "${ports[$i]}" | paste -sd ' ')" >&2
        else
          printf 'cluster %s: no port-forward to its registry: %s\n' "${names[$i]}" \
            "$(cat "$work/forward-$i.log" 2>/dev/null)" >&2
        fi
      done
      printf 'the objects are installed; run up again to wait once more\n' >&2
      exit 1
    fi
    sleep "$WAIT_POLL_SECONDS"
  done
  say "every registry reports every cluster synced"
}

what_to_check() {
  local i
  say ""
  say "What to check (per cluster):"
  for i in "${!names[@]}"; do
    say "  cluster ${names[$i]} (network ${networks[$i]}):"
    say "    kubectl --kubeconfig ${kubeconfigs[$i]} -n $SYSTEM_NAMESPACE get deployments,pods,services"
    say "    kubectl --kubeconfig ${kubeconfigs[$i]} -n $SYSTEM_NAMESPACE port-forward deploy/isthmus-registry 15014 &"
    say "    isthmusctl clusters --admin 127.0.0.1:15014     # every cluster synced"
    say "    kubectl --kubeconfig ${kubeconfigs[$i]} -n $SYSTEM_NAMESPACE get service isthmus-eastwestgateway   # EXTERNAL-IP: the network's gateway"
  done
  say "  inject a namespace: kubectl label namespace NS isthmus-injection=enabled"
  say "  mesh root: $root/root-cert.pem"
}

up() {
  local i
  ensure_intermediates
  for i in "${!names[@]}"; do
    install "$i"
  done
  for i in "${!names[@]}"; do
    remote_secrets "$i"
  done
  if [ "$wait_enabled" = 1 ]; then
    wait_synced
  else
    say "not waiting for the registries (--no-wait)"
  fi
  what_to_check
}

# --- down --------------------------------------------------------------------------------

# The kinds the manifests hold (and Secret, ConfigMap: the generated ones), namespaced
# first, the Namespace last, as KIND lines.
managed_kinds() {
  {
    "$kubectl_bin" kustomize "$manifests" | sed -n 's/^kind: *//p'
    printf '%s\n' Secret ConfigMap
  } | sort -u | grep -vx Namespace
  echo Namespace
}

down() {
  local i kinds kind out
  kinds=$(managed_kinds)
  for i in "${!names[@]}"; do
    for kind in $kinds; do
      out=$(kube "$i" delete "$kind" --all-namespaces -l "$MANAGED_BY" --wait=false --ignore-not-found 2>&1) ||
        die "cluster ${names[$i]}: deleting ${kind}s labelled $MANAGED_BY failed: $out"
      [ -z "$out" ] || printf '%s\n' "$out" | sed "s/^/cluster ${names[$i]}: /"
    done
    say "cluster ${names[$i]}: removed what up installed (namespace $SYSTEM_NAMESPACE goes once it is empty)"
  done
  say "the mesh root and intermediates in $root are kept"
}

"$command"
