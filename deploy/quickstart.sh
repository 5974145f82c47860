#!/usr/bin/env bash
# The README's quick start: a registry on its embedded store, serving the sample
# multi-network catalog in deploy/examples, and the view each network gets.
#
#   deploy/quickstart.sh        build, start the registry in the background, print the views
#   deploy/quickstart.sh down   stop the registry and remove everything this script created
#
# State (CA, store, credentials, log) lives in .isthmus-local/ at the repository root.
# Ports: ISTHMUS_GRPC_ADDR (127.0.0.1:15012), ISTHMUS_ADMIN_ADDR (127.0.0.1:15014).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
state="$root/.isthmus-local"
grpc=${ISTHMUS_GRPC_ADDR:-127.0.0.1:15012}
admin=${ISTHMUS_ADMIN_ADDR:-127.0.0.1:15014}
bin="$root/target/release"

stop_registry() {
  if [ -f "$state/registry.pid" ]; then
    pid=$(cat "$state/registry.pid")
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid"
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$state/registry.pid"
  fi
}

if [ "${1:-up}" = "down" ]; then
  stop_registry
  rm -rf "$state"
  echo "stopped; removed $state"
  exit 0
fi

echo "==> building (release)"
cargo build --release --quiet -p isthmus-registry

stop_registry
mkdir -p "$state"
if [ ! -f "$state/ca/cluster-a/ca-cert.pem" ]; then
  echo "==> creating the mesh CA (trust domain cluster.local, cluster cluster-a)"
  "$bin/isthmusctl" ca init --trust-domain cluster.local --cluster cluster-a --out "$state/ca"
fi

echo "==> starting isthmus-registry on $grpc (admin $admin), log in $state/registry.log"
"$bin/isthmus-registry" --cluster cluster-a --network network-a \
  --ca-dir "$state/ca/cluster-a" --data-dir "$state/data" \
  --resources "$root/deploy/examples" \
  --grpc-addr "$grpc" --admin-addr "$admin" >"$state/registry.log" 2>&1 &
echo $! >"$state/registry.pid"

# GET /readyz with bash alone, so the quick start needs nothing beyond a shell and cargo.
readyz() {
  local host=${admin%:*} port=${admin##*:} status
  exec 3<>"/dev/tcp/$host/$port" || return 1
  printf 'GET /readyz HTTP/1.0\r\nHost: %s\r\n\r\n' "$admin" >&3
  read -r _ status _ <&3 || true
  exec 3<&- 3>&-
  [ "$status" = 200 ]
}

ready=""
for _ in $(seq 100); do
  if readyz 2>/dev/null; then ready=yes; break; fi
  if ! kill -0 "$(cat "$state/registry.pid")" 2>/dev/null; then break; fi
  sleep 0.1
done
if [ -z "$ready" ]; then
  echo "the registry did not become ready; its log:" >&2
  cat "$state/registry.log" >&2
  stop_registry
  exit 1
fi

echo "==> getting a workload certificate with a one-time bootstrap token"
token=$("$bin/isthmusctl" token create --ca-dir "$state/ca/cluster-a" --namespace shop --service-account web --ttl 10m)
"$bin/isthmusctl" cert request --registry "$grpc" --root "$state/ca/root-cert.pem" --token "$token" --out "$state/web"

for net in network-a network-b; do
  echo
  echo "==> what a workload in $net sees"
  "$bin/isthmusctl" catalog --registry "$grpc" --root "$state/ca/root-cert.pem" --cert-dir "$state/web" --network "$net"
done

cat <<EOT

The registry keeps running (pid $(cat "$state/registry.pid")). Try:
  curl -s http://$admin/debug/catalog?network=network-b
  curl -s http://$admin/metrics | grep isthmus_
  edit deploy/examples/*.yaml and run isthmusctl catalog again
Stop it and remove its state with: deploy/quickstart.sh down
EOT
