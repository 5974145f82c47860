#!/usr/bin/env bash
# The README's quick start: a registry on its embedded store, serving the sample
# multi-network catalog in deploy/examples, and the view each network gets.
#
#   deploy/quickstart.sh        build, start the registry in the background, print the views
#   deploy/quickstart.sh down   stop the registry and remove everything this script created
#
# State (CA, store, credentials, logs) lives in .isthmus-local/ at the repository root.
# Ports: ISTHMUS_GRPC_ADDR (127.0.0.1:15012), ISTHMUS_ADMIN_ADDR (127.0.0.1:15014), and for
# the DNS proxy of network-a ISTHMUS_DNS_ADDR (127.0.0.1:15053), ISTHMUS_DNS_ADMIN_ADDR
# (127.0.0.1:15000).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
state="$root/.isthmus-local"
grpc=${ISTHMUS_GRPC_ADDR:-127.0.0.1:15012}
admin=${ISTHMUS_ADMIN_ADDR:-127.0.0.1:15014}
dns=${ISTHMUS_DNS_ADDR:-127.0.0.1:15053}
dns_admin=${ISTHMUS_DNS_ADMIN_ADDR:-127.0.0.1:15000}
bin="$root/target/release"

stop_pid() {
  local file="$state/$1.pid"
  if [ -f "$file" ]; then
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid"
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$file"
  fi
}

stop_all() {
  stop_pid dns
  stop_pid registry
}

if [ "${1:-up}" = "down" ]; then
  stop_all
  rm -rf "$state"
  echo "stopped; removed $state"
  exit 0
fi

echo "==> building (release)"
cargo build --release --quiet -p isthmus-registry -p isthmus-dns

stop_all
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
  local addr=$1 host=${1%:*} port=${1##*:} status
  exec 3<>"/dev/tcp/$host/$port" || return 1
  printf 'GET /readyz HTTP/1.0\r\nHost: %s\r\n\r\n' "$addr" >&3
  read -r _ status _ <&3 || true
  exec 3<&- 3>&-
  [ "$status" = 200 ]
}

ready=""
for _ in $(seq 100); do
  if readyz "$admin" 2>/dev/null; then ready=yes; break; fi
  if ! kill -0 "$(cat "$state/registry.pid")" 2>/dev/null; then break; fi
  sleep 0.1
done
if [ -z "$ready" ]; then
  echo "the registry did not become ready; its log:" >&2
  cat "$state/registry.log" >&2
  stop_all
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

echo
echo "==> starting isthmus-dns for network-a on $dns (admin $dns_admin), log in $state/dns.log"
token=$("$bin/isthmusctl" token create --ca-dir "$state/ca/cluster-a" --namespace isthmus-system --service-account isthmus-dns --ttl 10m)
"$bin/isthmusctl" cert request --registry "$grpc" --root "$state/ca/root-cert.pem" --token "$token" --out "$state/dns" >/dev/null
"$bin/isthmus-dns" --registry "$grpc" --root "$state/ca/root-cert.pem" --cert-dir "$state/dns" \
  --network network-a --cluster cluster-a --namespace shop \
  --listen "$dns" --admin-addr "$dns_admin" >"$state/dns.log" 2>&1 &
echo $! >"$state/dns.pid"
for _ in $(seq 100); do
  if readyz "$dns_admin" 2>/dev/null; then break; fi
  sleep 0.1
done
if command -v dig >/dev/null 2>&1; then
  for name in reviews reviews.shop.svc.cluster.local db.example.internal; do
    echo "\$ dig @${dns%:*} -p ${dns##*:} +short $name"
    dig @"${dns%:*}" -p "${dns##*:}" +short "$name" A
  done
else
  echo "(install dnsutils to query it with dig: dig @${dns%:*} -p ${dns##*:} reviews.shop.svc.cluster.local)"
fi

cat <<EOT

The registry (pid $(cat "$state/registry.pid")) and the DNS proxy (pid $(cat "$state/dns.pid")) keep running. Try:
  curl -s http://$admin/debug/catalog?network=network-b
  curl -s http://$admin/metrics | grep isthmus_
  curl -s http://$dns_admin/config_dump
  edit deploy/examples/*.yaml and run isthmusctl catalog or dig again
Stop them and remove their state with: deploy/quickstart.sh down
EOT
