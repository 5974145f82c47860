# The Kubernetes flavour of the quick start, sourced by deploy/quickstart.sh
# (`deploy/quickstart.sh kubernetes`): a real kube-apiserver with its etcd on this machine's
# loopback acts as cluster-a's API. The registry watches it through the reader role of
# deploy/kubernetes/rbac.yaml, and cluster-a holds a Service `hello` in namespace `shop`
# whose EndpointSlice names a "pod" running as VM A's sample app (there is no kubelet: the
# Pod object is created through the API, with VM A's address and service account, as a
# kubelet would report it). VM B then calls hello.shop.svc.cluster.local by name, through
# both gateways.
#
# The peers are built with Go from tests/kube (the same build the tests use; Go >= the
# version in tests/kube/go.mod must be installed). Their flags mirror the tests' harness
# (tests/src/harness/kube.rs): serving certificate from a CA of our own, a service-account
# signing key, token authentication, RBAC and the admission plugins on.

kube_dir="$state/kube"
kube_bin="$target/kube"
kube_api=127.0.0.1:16443
etcd_client=127.0.0.1:16379
etcd_peer=127.0.0.1:16380
kubectl_admin() { "$kube_bin/kubectl" --kubeconfig "$kube_dir/admin.kubeconfig" "$@"; }

kube_build() {
  command -v openssl >/dev/null 2>&1 || die "the Kubernetes flavour needs openssl (package openssl) for the API server's certificates"
  say "building kube-apiserver, kubectl and etcd (tests/kube, Go) into $kube_bin"
  command -v go >/dev/null 2>&1 ||
    die "the Kubernetes flavour needs Go (>= $(sed -n 's/^go //p' "$root/tests/kube/go.mod")) to build kube-apiserver"
  as_builder "$root/tests/kube/build.sh" "$kube_bin"
}

# A CA, the API server's serving certificate for 127.0.0.1, and a service-account key pair.
kube_pki() {
  local d=$kube_dir
  mkdir -p "$d"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj /CN=isthmus-quickstart-kube-ca -keyout "$d/ca.key" -out "$d/ca.crt" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=kube-apiserver \
    -keyout "$d/apiserver.key" -out "$d/apiserver.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n' >"$d/san.ext"
  openssl x509 -req -in "$d/apiserver.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" \
    -CAcreateserial -days 2 -extfile "$d/san.ext" -out "$d/apiserver.crt" 2>/dev/null
  openssl ecparam -name prime256v1 -genkey -noout -out "$d/sa.key"
  openssl ec -in "$d/sa.key" -pubout -out "$d/sa.pub" 2>/dev/null
  local token
  token=$(openssl rand -hex 24)
  printf '%s,quickstart-admin,quickstart-admin,system:masters\n' "$token" >"$d/tokens.csv"
  chmod 600 "$d"/*.key "$d/tokens.csv"
  kube_kubeconfig "$d/admin.kubeconfig" "$token"
}

# kube_kubeconfig FILE TOKEN: a kubeconfig for cluster-a's API with TOKEN.
kube_kubeconfig() {
  cat >"$1" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
- name: $cluster
  cluster: {server: "https://$kube_api", certificate-authority-data: "$(base64 -w0 "$kube_dir/ca.crt")"}
users:
- name: $cluster
  user: {token: "$2"}
contexts:
- name: $cluster
  context: {cluster: $cluster, user: $cluster}
current-context: $cluster
KUBECONFIG
  chmod 600 "$1"
}

kube_start() {
  kube_pki
  say "starting etcd on $etcd_client and kube-apiserver on https://$kube_api (cluster-a's API), logs $logs/etcd.log, $logs/kube-apiserver.log"
  start etcd - "$kube_bin/etcd" --data-dir "$kube_dir/etcd" \
    --listen-client-url "http://$etcd_client" --listen-peer-url "http://$etcd_peer"
  wait_for etcd "GET http://$etcd_client/health" http_ok "http://$etcd_client/health"
  local d=$kube_dir issuer=https://kubernetes.default.svc.cluster.local
  start kube-apiserver - "$kube_bin/kube-apiserver" --etcd-servers "http://$etcd_client" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "${kube_api##*:}" \
    --tls-cert-file "$d/apiserver.crt" --tls-private-key-file "$d/apiserver.key" \
    --client-ca-file "$d/ca.crt" --token-auth-file "$d/tokens.csv" \
    --service-account-key-file "$d/sa.pub" --service-account-signing-key-file "$d/sa.key" \
    --service-account-issuer "$issuer" --api-audiences "$issuer" \
    --authorization-mode Node,RBAC --service-cluster-ip-range 10.96.0.0/16 \
    --enable-admission-plugins NamespaceLifecycle,LimitRanger,ServiceAccount,NodeRestriction,DefaultTolerationSeconds,ResourceQuota,MutatingAdmissionWebhook,ValidatingAdmissionWebhook \
    --endpoint-reconciler-type none --profiling=false
  wait_for kube-apiserver "kubectl get --raw /readyz" kubectl_admin get --raw /readyz
  say "installing the CRDs (Istio's networking kinds, isthmus' Network) and the reader role"
  kubectl_admin apply --server-side -f "$root/tests/kube/istio-crds.yaml" >/dev/null
  kubectl_admin apply --server-side -f "$root/deploy/kubernetes/crds/network.yaml" >/dev/null
  kubectl_admin apply --server-side -f "$root/deploy/kubernetes/rbac.yaml" >/dev/null
  kubectl_admin wait --for condition=Established --timeout 60s crd --all >/dev/null
  local reader
  reader=$(kubectl_admin create token isthmus-reader -n isthmus-system --duration 24h)
  kube_kubeconfig "$kube_dir/reader.kubeconfig" "$reader"
}

# Cluster-a's Service `hello`: its one endpoint is a Pod object standing for VM A's app,
# with VM A's address and service account (so its mesh identity is VM A's).
kube_objects() {
  local g
  g=$(group a)
  say "creating Service hello, Pod $g-0 and their EndpointSlice in cluster-a's namespace shop"
  kubectl_admin apply -f - >/dev/null <<OBJECTS
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: $g, namespace: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: $g-0, namespace: shop, labels: {app: hello}}
spec:
  serviceAccountName: $g
  containers: [{name: app, image: isthmus.local/sample-app:quickstart}]
---
apiVersion: v1
kind: Service
metadata: {name: hello, namespace: shop}
spec:
  selector: {app: hello}
  ports: [{name: http, port: 9080, targetPort: 9080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: hello-1, namespace: shop, labels: {kubernetes.io/service-name: hello}}
addressType: IPv4
ports: [{name: http, port: 9080, protocol: TCP}]
endpoints:
- addresses: [$vm_ip]
  conditions: {ready: true}
  targetRef: {kind: Pod, name: $g-0, namespace: shop}
OBJECTS
  kubectl_admin patch pod "$g-0" -n shop --subresource status --type merge -p \
    "{\"status\":{\"phase\":\"Running\",\"podIP\":\"$vm_ip\",\"podIPs\":[{\"ip\":\"$vm_ip\"}],\"conditions\":[{\"type\":\"Ready\",\"status\":\"True\"}]}}" >/dev/null
}

kube_demo() {
  local url=http://hello.shop.svc.cluster.local:9080/ answer=""
  echo
  say "from VM B, by the Kubernetes service's name: ip netns exec isthmus-vm-b curl -sS $url"
  answer=$(call_until b "$url" "hello from vm-a")
  if [ -z "$answer" ]; then
    echo "quickstart: VM B could not call hello within ${ready_timeout}s: $(cat "$state/curl.err" 2>/dev/null)" >&2
    log_tail registry 20
    log_tail agent-b 20
    return 1
  fi
  printf '%s\n' "$answer" | sed 's/^/    /'
  echo
  say "the registry's clusters: $bin/isthmusctl clusters --admin $admin"
  "$bin/isthmusctl" clusters --admin "$admin" | sed 's/^/    /'
  cat <<HELP

Cluster-a's API (as root):
  $kube_bin/kubectl --kubeconfig $kube_dir/admin.kubeconfig get svc,endpointslices,pods -n shop
  curl -s http://$admin/debug/clusters
  Mark VM A's endpoint ready: false in the EndpointSlice hello-1 (kubectl edit) and watch
  VM B's view follow: ip netns exec isthmus-vm-b curl -s http://127.0.0.1:15000/config_dump
HELP
}
