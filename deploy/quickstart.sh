#!/usr/bin/env bash
# The README's quick start: a whole multi-network mesh on one Linux machine, built from
# network namespaces. Two networks that use the same addresses inside (the VM of each is
# 10.10.0.7), a WAN between them that only their east-west gateways are on, one registry,
# and in each network a VM running a sample app behind isthmus-vm-agent. A process on VM A
# then calls the app on VM B by its mesh name, with no change to either app.
#
#   deploy/quickstart.sh             build (release), bring the mesh up, show a call across
#                                    the networks and who saw which identity on the way
#   deploy/quickstart.sh kubernetes  the same, with a real kube-apiserver as cluster-a's API:
#                                    the registry watches it, and VM B calls a Kubernetes
#                                    Service whose endpoint is VM A's app (needs Go to build
#                                    the API server; see deploy/quickstart-kubernetes.sh)
#   deploy/quickstart.sh ha          the same with an HA set of registries: three etcd
#                                    members and three registries on them, each pair in a
#                                    namespace of its own (isthmus-reg-0..2, 198.18.0.2-4);
#                                    the gateways and agents are given all three. After the
#                                    call it stops the registry agent A follows and calls
#                                    again (needs etcd: apt-get install etcd-server)
#   deploy/quickstart.sh peered      the same as two clusters, each with its own registry and
#                                    store (cluster-a's on 198.18.0.1 holds network-a and VM
#                                    A; cluster-b's on 198.18.0.5, admin 127.0.0.1:15114,
#                                    holds network-b and VM B), peered: each imports what the
#                                    other exports. VM A calls reviews, which only cluster-b's
#                                    registry has; then cluster-b's registry is stopped, the
#                                    call still goes through on what cluster-a kept (marked
#                                    stale), and it is started again
#   deploy/quickstart.sh down        stop everything it started and remove every namespace,
#                                    interface, /etc/netns entry and file it created
#   deploy/quickstart.sh status      what is up
#
# Between the networks the agents carry the call over a pooled tunnel to the destination
# network's gateway on 15008: QUIC (15008/udp) raced against HTTP/2 (HBONE, 15008/tcp),
# QUIC preferred. ISTHMUS_TRANSPORT picks one for a look: quic or h2 (the agents'
# --tunnel-transports), or sni, which starts the agents without tunnels (--tunnel-port 0)
# so the same call takes the gateway's SNI passthrough (15443); the closing "path" says
# which transport carried it.
#
# `up` refuses to start over a mesh that is up, or over what a failed `up` left for a look
# (it says what failed, with the log's tail): run `down` first. `down` is idempotent.
#
# Root is needed: it creates network namespaces and veth pairs (CAP_SYS_ADMIN,
# CAP_NET_ADMIN) and nftables rules, and needs `ip` (iproute2), `nft` (nftables) and
# `curl`. `up` builds as the user who ran sudo when there is one. ISTHMUS_NO_BUILD=1 skips
# the build (use binaries built already); CARGO_TARGET_DIR is honoured.
#
# Layout (ISTHMUS_WAN_PREFIX, 198.18.0 by default, is a /24 of the RFC 2544 benchmarking
# range, never a real network; the test harness uses 198.18.1-250):
#
#   root namespace: isthmus-root 198.18.0.1/24, isthmus-registry on 198.18.0.1
#        |                          (gRPC 15012; admin 15014 on 127.0.0.1, where its
#        |                           /debug/* answers)
#   isthmus-wan: bridge br0 ── vh
#                           ├─ va ── wan0 198.18.0.10/24 in isthmus-net-a (network-a)
#                           └─ vb ── wan0 198.18.0.20/24 in isthmus-net-b (network-b)
#
#   isthmus-net-X: the gateway of network-X on its wan0 address (SNI 15443, tunnels
#                  15008, metrics 15020, health 15021; admin 127.0.0.1:15000 inside the namespace); forwarding on (in this namespace only); the nftables
#                  table inet isthmus-quickstart masquerades what the VM sends out of wan0
#     vm-X 169.254.1.1/32 ── eth0 10.10.0.7/32 in isthmus-vm-X (the VM), whose default
#     route 10.10.0.7/32 dev vm-X                route is via 169.254.1.1
#
#   isthmus-vm-X: sample-app on 0.0.0.0:9080 (its source is deploy/sample-app),
#                 isthmus-vm-agent (admin 127.0.0.1:15000, metrics 0.0.0.0:15020,
#                 health 0.0.0.0:15021);
#                 /etc/netns/isthmus-vm-X/resolv.conf says
#                 nameserver 10.10.0.53, and the agent answers the mesh names sent there
#
# Both VMs are 10.10.0.7: nothing outside a network can route to its VM, hence the
# masquerade; gateway X reaches VM X directly. The script never touches the root
# namespace's forwarding, and no namespace gets a default route: the VMs reach the registry
# and the gateways, nothing beyond. The catalog is rendered from
# deploy/examples/mesh/*.yaml.in into .isthmus-local/resources/ (watched by the registry).
# State, credentials, PIDs and logs live in .isthmus-local/ at the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
state="$root/.isthmus-local"
pids="$state/pids"
logs="$state/logs"
target=${CARGO_TARGET_DIR:-$root/target}
bin="$target/release"

wan=${ISTHMUS_WAN_PREFIX:-198.18.0}
registry_ip="$wan.1"
grpc="$registry_ip:15012"
admin="127.0.0.1:15014"
# `peered`: cluster-b's registry, in the root namespace too, on a second address.
registry_b_ip="$wan.5"
grpc_b="$registry_b_ip:15012"
admin_b="127.0.0.1:15114"
vm_ip=10.10.0.7
nameserver=10.10.0.53
next_hop=169.254.1.1
root_link=isthmus-root
ns_wan=isthmus-wan
nets=(a b)
trust_domain=cluster.local
cluster="cluster-a"
ready_timeout=${ISTHMUS_READY_TIMEOUT:-60}
transport=${ISTHMUS_TRANSPORT:-auto}

# Per network (a or b): its namespace, its VM's namespace, the network id, the gateway's
# WAN address, and the VM's WorkloadGroup (also its service account and app label).
ns_net() { echo "isthmus-net-$1"; }
ns_vm() { echo "isthmus-vm-$1"; }
network() { echo "network-$1"; }
gw_ip() { case $1 in a) echo "$wan.10" ;; b) echo "$wan.20" ;; esac; }
group() { case $1 in a) echo frontend ;; b) echo reviews ;; esac; }
# The cluster, registry and CA directory of network X's gateway and VM: one cluster and
# registry (set) for both, except when `peered`, where network-b is cluster-b's.
cluster_of() { if [ "$flavour" = peered ] && [ "$1" = b ]; then echo cluster-b; else echo "$cluster"; fi; }
reg_of() { if [ "$flavour" = peered ] && [ "$1" = b ]; then echo "$grpc_b"; else echo "$grpc"; fi; }
ca_of() { echo "$state/ca/$(cluster_of "$1")"; }
all_namespaces() { echo isthmus-vm-a isthmus-vm-b isthmus-net-a isthmus-net-b isthmus-reg-0 isthmus-reg-1 isthmus-reg-2 "$ns_wan"; }

# The HA set (`ha`): registry I of 0..2 and its etcd member in namespace isthmus-reg-I, on
# the WAN at .2, .3, .4.
regs=(0 1 2)
ns_reg() { echo "isthmus-reg-$1"; }
reg_ip() { echo "$wan.$((2 + $1))"; }
etcd_endpoints() {
  local i out=()
  for i in "${regs[@]}"; do out+=("http://$(reg_ip "$i"):2379"); done
  (IFS=,; echo "${out[*]}")
}
registry_set() {
  local i out=()
  for i in "${regs[@]}"; do out+=("$(reg_ip "$i"):15012"); done
  (IFS=,; echo "${out[*]}")
}

say() { printf '==> %s\n' "$*"; }
die() {
  printf 'quickstart: %s\n' "$*" >&2
  exit 1
}

require_root() {
  if [ "$(id -u)" -ne 0 ]; then
    die "the local mesh creates network namespaces, veth pairs and nftables rules: run it as root (deploy/quickstart.sh${1:+ $1} as root, or with sudo in front)"
  fi
}

require_tools() {
  local missing=() tool package
  for tool in ip:iproute2 nft:nftables curl:curl; do
    package=${tool#*:} tool=${tool%%:*}
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool (package $package)")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    die "missing: ${missing[*]}; on Debian/Ubuntu: apt-get install iproute2 nftables curl"
  fi
}

netns_exists() { [ -e "/var/run/netns/$1" ]; }

# ---- processes -----------------------------------------------------------------------------

# start NAME NAMESPACE|- PROGRAM ARGS...: runs PROGRAM in its own session (so closing the
# terminal or ^C on this script leaves it running), logs to logs/NAME.log, records
# "PID PROGRAM" in pids/NAME. `ip netns exec` and `setsid` both exec, so $! is PROGRAM's
# PID.
start() {
  local name=$1 ns=$2 program=$3
  shift 3
  local log="$logs/$name.log"
  program=$(readlink -f "$program")
  if [ "$ns" = - ]; then
    setsid "$program" "$@" </dev/null >"$log" 2>&1 &
  else
    ip netns exec "$ns" setsid "$program" "$@" </dev/null >"$log" 2>&1 &
  fi
  echo "$! $program" >"$pids/$name"
}

# The PID recorded for NAME if that process still runs the recorded program (a PID the
# kernel handed to someone else since is not ours; a rebuilt binary shows as deleted).
live_pid() {
  local file="$pids/$1" pid program exe
  [ -f "$file" ] || return 1
  read -r pid program <"$file" || return 1
  [ -n "$pid" ] || return 1
  exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
  [ "${exe% (deleted)}" = "$program" ] || return 1
  echo "$pid"
}

running() { live_pid "$1" >/dev/null; }

# Whether PID runs: exists and is not a zombie (an exited process waits there until its
# parent, often init by now, reaps it).
alive() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [ "${stat%% *}" != Z ]
}

# stop PID LABEL: SIGTERM, up to 10 s (a gateway drains), then SIGKILL.
stop_pid() {
  local pid=$1 label=$2
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 100); do
    alive "$pid" || {
      echo "stopped $label (pid $pid)"
      return 0
    }
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  echo "killed $label (pid $pid): it did not exit within 10 s of SIGTERM"
}

log_tail() {
  local name=$1 lines=${2:-30} log="$logs/$1.log"
  if [ -s "$log" ]; then
    echo "--- last $lines lines of $log" >&2
    tail -n "$lines" "$log" >&2
    echo "---" >&2
  else
    echo "($log is empty)" >&2
  fi
}

# How process NAME, started by this run and gone, ended.
exit_status() {
  local pid status
  read -r pid _ <"$pids/$1" || return 0
  wait "$pid" 2>/dev/null && status=0 || status=$?
  case $status in
  127) echo "exited" ;;
  0) echo "exited with status 0" ;;
  *) if [ "$status" -gt 128 ]; then echo "was killed by signal $((status - 128))"; else echo "exited with status $status"; fi ;;
  esac
}

# wait_for NAME|- WHAT COMMAND...: runs COMMAND until it succeeds, for at most
# $ready_timeout seconds, as long as process NAME runs; on failure shows NAME's log.
wait_for() {
  local name=$1 what=$2
  shift 2
  local deadline=$((SECONDS + ready_timeout))
  while [ $SECONDS -lt $deadline ]; do
    if "$@" >/dev/null 2>&1; then
      return 0
    fi
    if [ "$name" != - ] && ! running "$name"; then
      echo "quickstart: $name $(exit_status "$name") before $what" >&2
      log_tail "$name"
      return 1
    fi
    sleep 0.5
  done
  if [ "$name" = - ]; then
    echo "quickstart: no success within ${ready_timeout}s: $what" >&2
  else
    echo "quickstart: $name did not become ready within ${ready_timeout}s ($what)" >&2
    log_tail "$name"
  fi
  return 1
}

http_ok() { curl -fsS --max-time 2 -o /dev/null "$1"; }
in_ns() {
  local ns=$1
  shift
  ip netns exec "$ns" "$@"
}

# ---- down ----------------------------------------------------------------------------------

down() {
  require_root down
  local removed=0 name pid ns out file
  # The agents first (they undo their capture), then the apps, the gateways, the registry.
  for name in agent-a agent-b app-a app-b gateway-a gateway-b registry registry-b registry-0 \
    registry-1 registry-2 etcd-0 etcd-1 etcd-2 kube-apiserver etcd; do
    if pid=$(live_pid "$name"); then
      stop_pid "$pid" "$name"
      removed=1
    fi
  done
  # What an earlier version of this script started (a registry and a DNS proxy on
  # loopback), recorded as a bare PID: stopped if it still runs one of our binaries.
  for file in "$state/registry.pid" "$state/dns.pid"; do
    [ -f "$file" ] || continue
    pid=$(cat "$file")
    case $(readlink "/proc/$pid/exe" 2>/dev/null) in
    "$(readlink -f "$bin")"/isthmus-*) stop_pid "$pid" "$(basename "$file" .pid)" ;;
    esac
  done
  for ns in isthmus-vm-a isthmus-vm-b; do
    if netns_exists "$ns" && [ -x "$bin/isthmus-vm-agent" ]; then
      if out=$(in_ns "$ns" "$bin/isthmus-vm-agent" cleanup 2>&1); then
        echo "isthmus-vm-agent cleanup in $ns: ${out:-done}"
      else
        echo "isthmus-vm-agent cleanup in $ns failed (its rules go with the namespace):"
        printf '%s\n' "$out" | tail -n 5 | sed 's/^/  /'
      fi
    fi
  done
  # Anything else still in our namespaces was started there by hand: it would keep a
  # namespace's interfaces alive after `ip netns del`.
  for ns in $(all_namespaces); do
    netns_exists "$ns" || continue
    for pid in $(ip netns pids "$ns" 2>/dev/null); do
      echo "killing pid $pid ($(cat "/proc/$pid/comm" 2>/dev/null || echo '?')), left in $ns"
      kill -KILL "$pid" 2>/dev/null || true
    done
  done
  if ip link show dev "$root_link" >/dev/null 2>&1; then
    ip link del "$root_link"
    echo "deleted interface $root_link"
    removed=1
  fi
  for ns in $(all_namespaces); do
    if netns_exists "$ns"; then
      ip netns del "$ns"
      echo "deleted network namespace $ns"
      removed=1
    fi
    if [ -d "/etc/netns/$ns" ]; then
      rm -rf "/etc/netns/$ns"
      echo "removed /etc/netns/$ns"
      removed=1
    fi
  done
  # /etc/netns itself only if we made it and it is empty now.
  if [ -f "$state/created-etc-netns" ]; then
    rmdir /etc/netns 2>/dev/null && echo "removed /etc/netns (empty)"
  fi
  if [ -d "$state" ]; then
    rm -rf "$state"
    echo "removed $state"
    removed=1
  fi
  if [ "$removed" = 0 ]; then
    echo "nothing to remove: the local mesh is not up"
  fi
}

# ---- status --------------------------------------------------------------------------------

status() {
  local name ns any=0 pid
  for name in etcd kube-apiserver registry registry-b etcd-0 etcd-1 etcd-2 registry-0 registry-1 \
    registry-2 gateway-a gateway-b app-a app-b agent-a agent-b; do
    if pid=$(live_pid "$name"); then
      echo "$name: running (pid $pid), log $logs/$name.log"
      any=1
    elif [ -f "$pids/$name" ]; then
      echo "$name: not running; log $logs/$name.log"
      any=1
    fi
  done
  for ns in $(all_namespaces); do
    if netns_exists "$ns"; then
      echo "namespace $ns"
      any=1
    fi
  done
  [ "$any" = 1 ] || echo "the local mesh is not up"
}

# ---- up ------------------------------------------------------------------------------------

already_up() {
  local ns
  [ -e "$state" ] && return 0
  ip link show dev "$root_link" >/dev/null 2>&1 && return 0
  for ns in $(all_namespaces); do
    netns_exists "$ns" && return 0
  done
  return 1
}

build() {
  if [ "${ISTHMUS_NO_BUILD:-}" = 1 ]; then
    say "not building (ISTHMUS_NO_BUILD=1); using $bin"
    return
  fi
  say "building (release): registry, isthmusctl, gateway, VM agent, sample app"
  local args=(build --release --quiet
    -p isthmus-registry --bin isthmus-registry --bin isthmusctl
    -p isthmus-gateway --bin isthmus-gateway
    -p isthmus-vm-agent --bin isthmus-vm-agent
    -p isthmus-sample-app --bin sample-app)
  if [ -z "${SUDO_USER:-}" ] || [ "$SUDO_USER" = root ]; then
    command -v cargo >/dev/null 2>&1 ||
      die "cargo is not on PATH: install a Rust toolchain, or build first and run with ISTHMUS_NO_BUILD=1"
  fi
  # The registry's etcd client compiles etcd's API (.proto files) when it is built.
  [ -n "${PROTOC:-}" ] || command -v protoc >/dev/null 2>&1 ||
    die "protoc is not on PATH (the registry's build needs it): on Debian/Ubuntu apt-get install protobuf-compiler, or build first and run with ISTHMUS_NO_BUILD=1"
  as_builder cargo "${args[@]}"
}

# as_builder COMMAND ARGS...: runs a build as the user who ran sudo when there is one (their
# toolchains, and target/ stays theirs), else as is.
as_builder() {
  if [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ]; then
    local home
    home=$(getent passwd "$SUDO_USER" | cut -d: -f6)
    sudo -u "$SUDO_USER" env "PATH=$home/.cargo/bin:$home/go/bin:$PATH" "HOME=$home" \
      ${CARGO_TARGET_DIR:+"CARGO_TARGET_DIR=$CARGO_TARGET_DIR"} "$@"
  else
    "$@"
  fi
}

check_binaries() {
  local b
  for b in isthmus-registry isthmusctl isthmus-gateway isthmus-vm-agent sample-app; do
    [ -x "$bin/$b" ] || die "$bin/$b is missing: build it (cargo build --release ...) or drop ISTHMUS_NO_BUILD"
  done
}

# Into resources/ (the registry's), or when `peered` network-a and VM A's group into
# resources/ (cluster-a's registry) and network-b and VM B's into resources-b/ (cluster-b's).
render_catalog() {
  mkdir -p "$state/resources"
  local t out
  for t in "$root"/deploy/examples/mesh/*.yaml.in; do
    out="$state/resources"
    if [ "$flavour" = peered ]; then
      case $(basename "$t") in network-b.* | reviews.*) out="$state/resources-b" ;; esac
      mkdir -p "$out"
    fi
    sed "s/@WAN@/$wan/g" "$t" >"$out/$(basename "${t%.in}")"
  done
}

# The WAN, both networks and their VMs.
make_namespaces() {
  local x ns vm gw
  say "creating namespaces: $ns_wan, isthmus-net-a, isthmus-net-b, isthmus-vm-a, isthmus-vm-b"
  ip netns add "$ns_wan"
  ip -n "$ns_wan" link set lo up
  ip -n "$ns_wan" link add br0 type bridge
  ip -n "$ns_wan" link set br0 up
  ip link add "$root_link" type veth peer name vh netns "$ns_wan"
  ip -n "$ns_wan" link set vh master br0 up
  ip addr add "$registry_ip/24" dev "$root_link"
  if [ "$flavour" = peered ]; then
    ip addr add "$registry_b_ip/24" dev "$root_link"
  fi
  ip link set "$root_link" up

  for x in "${nets[@]}"; do
    ns=$(ns_net "$x") vm=$(ns_vm "$x") gw=$(gw_ip "$x")
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip -n "$ns_wan" link add "v$x" type veth peer name wan0 netns "$ns"
    ip -n "$ns_wan" link set "v$x" master br0 up
    ip -n "$ns" addr add "$gw/24" dev wan0
    ip -n "$ns" link set wan0 up

    # The VM: a /32 behind its network, which routes for it and masquerades what it sends
    # to the WAN (nothing outside the network can route back to 10.10.0.7: both have it).
    ip netns add "$vm"
    ip -n "$vm" link set lo up
    ip -n "$ns" link add "vm-$x" type veth peer name eth0 netns "$vm"
    ip -n "$ns" addr add "$next_hop/32" dev "vm-$x" scope link
    ip -n "$ns" link set "vm-$x" up
    ip -n "$ns" route add "$vm_ip/32" dev "vm-$x" src "$gw"
    ip -n "$vm" addr add "$vm_ip/32" dev eth0
    ip -n "$vm" link set eth0 up
    ip -n "$vm" route add default via "$next_hop" dev eth0 onlink
    # Per namespace: the root namespace's forwarding is left alone.
    in_ns "$ns" sh -c 'echo 1 >/proc/sys/net/ipv4/ip_forward'
    in_ns "$ns" nft -f - <<EOF
table inet isthmus-quickstart {
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    oifname "wan0" fib saddr type != local masquerade
  }
}
EOF
    # `ip netns exec` bind-mounts this over /etc/resolv.conf for the VM's processes.
    [ -d /etc/netns ] || {
      mkdir -p /etc/netns
      touch "$state/created-etc-netns"
    }
    mkdir -p "/etc/netns/$vm"
    printf 'nameserver %s\n' "$nameserver" >"/etc/netns/$vm/resolv.conf"
  done
}

# The HA set's namespaces, each on the WAN bridge.
make_registry_namespaces() {
  local i ns
  say "creating namespaces: isthmus-reg-0, isthmus-reg-1, isthmus-reg-2"
  for i in "${regs[@]}"; do
    ns=$(ns_reg "$i")
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip -n "$ns_wan" link add "vr$i" type veth peer name wan0 netns "$ns"
    ip -n "$ns_wan" link set "vr$i" master br0 up
    ip -n "$ns" addr add "$(reg_ip "$i")/24" dev wan0
    ip -n "$ns" link set wan0 up
  done
}

# Three etcd members, then three registries on them, each pair in its namespace.
start_registry_set() {
  local i ip ns cluster_peers=() etcd_bin
  etcd_bin=$(command -v etcd) || die "the HA set needs etcd: apt-get install etcd-server"
  for i in "${regs[@]}"; do cluster_peers+=("reg-$i=http://$(reg_ip "$i"):2380"); done
  for i in "${regs[@]}"; do
    ip=$(reg_ip "$i") ns=$(ns_reg "$i")
    say "starting etcd member reg-$i in $ns on $ip:2379, log $logs/etcd-$i.log"
    start "etcd-$i" "$ns" "$etcd_bin" --name "reg-$i" --data-dir "$state/etcd-$i" \
      --listen-client-urls "http://$ip:2379" --advertise-client-urls "http://$ip:2379" \
      --listen-peer-urls "http://$ip:2380" --initial-advertise-peer-urls "http://$ip:2380" \
      --initial-cluster "$(IFS=,; echo "${cluster_peers[*]}")" --initial-cluster-state new \
      --initial-cluster-token isthmus-quickstart
  done
  for i in "${regs[@]}"; do
    wait_for "etcd-$i" "GET http://$(reg_ip "$i"):2379/health" http_ok "http://$(reg_ip "$i"):2379/health"
  done
  for i in "${regs[@]}"; do
    ip=$(reg_ip "$i") ns=$(ns_reg "$i")
    say "starting isthmus-registry $i in $ns on $ip:15012 (store: etcd; admin 127.0.0.1:15014 in $ns), log $logs/registry-$i.log"
    start "registry-$i" "$ns" "$bin/isthmus-registry" --cluster "$cluster" --network network-a \
      --ca-dir "$state/ca/$cluster" --resources "$state/resources" \
      --store etcd --etcd-endpoints "$(etcd_endpoints)" \
      --grpc-addr "$ip:15012" --admin-addr 127.0.0.1:15014
  done
  for i in "${regs[@]}"; do
    wait_for "registry-$i" "GET http://127.0.0.1:15014/readyz in $(ns_reg "$i")" \
      in_ns "$(ns_reg "$i")" curl -fsS --max-time 2 -o /dev/null http://127.0.0.1:15014/readyz
  done
}

start_registry() {
  local kube=() peer=()
  if [ "$flavour" = kubernetes ]; then
    kube=(--kubeconfig "$kube_dir/reader.kubeconfig")
  fi
  if [ "$flavour" = peered ]; then
    peer=(--peer "cluster-b=$grpc_b")
  fi
  say "starting isthmus-registry on $grpc (admin http://$admin), log $logs/registry.log"
  start registry - "$bin/isthmus-registry" --cluster "$cluster" --network network-a \
    --ca-dir "$state/ca/$cluster" --data-dir "$state/data" --resources "$state/resources" \
    --grpc-addr "$grpc" --admin-addr "$admin" "${kube[@]}" "${peer[@]}"
  wait_for registry "GET http://$admin/readyz" http_ok "http://$admin/readyz"
  if [ "$flavour" = peered ]; then
    start_registry_b
  fi
}

# `peered`: cluster-b's registry, with its own store and resources, importing cluster-a's.
start_registry_b() {
  say "starting cluster-b's isthmus-registry on $grpc_b (admin http://$admin_b), peered with cluster-a's, log $logs/registry-b.log"
  start registry-b - "$bin/isthmus-registry" --cluster cluster-b --network network-b \
    --ca-dir "$state/ca/cluster-b" --data-dir "$state/data-b" --resources "$state/resources-b" \
    --grpc-addr "$grpc_b" --admin-addr "$admin_b" --peer "cluster-a=$grpc"
  wait_for registry-b "GET http://$admin_b/readyz" http_ok "http://$admin_b/readyz"
}

start_gateway() {
  local x=$1 gw token
  gw=$(gw_ip "$x")
  token=$("$bin/isthmusctl" token create --ca-dir "$(ca_of "$x")" \
    --namespace isthmus-system --service-account "eastwest-$(network "$x")" --ttl 10m)
  say "starting the gateway of $(network "$x") in $(ns_net "$x") on $gw:15443, log $logs/gateway-$x.log"
  mkdir -p "$state/gateway-$x"
  start "gateway-$x" "$(ns_net "$x")" "$bin/isthmus-gateway" \
    --network "$(network "$x")" --cluster "$(cluster_of "$x")" --registry "$(reg_of "$x")" \
    --root "$state/ca/root-cert.pem" --cert-dir "$state/gateway-$x" --token "$token" \
    --sni-addr "$gw:15443" --admin-addr 127.0.0.1:15000 --metrics-addr "$gw:15020" --health-addr "$gw:15021" \
    --drain-deadline 5s
}

start_app() {
  local x=$1
  say "starting sample-app vm-$x in $(ns_vm "$x") on 0.0.0.0:9080, log $logs/app-$x.log"
  start "app-$x" "$(ns_vm "$x")" "$bin/sample-app" --listen 0.0.0.0:9080 --name "vm-$x"
}

start_agent() {
  local x=$1 g dir
  g=$(group "$x") dir="$state/vm-$x"
  mkdir -p "$dir/state"
  "$bin/isthmusctl" vm onboard --registry "$(reg_of "$x")" --ca-dir "$(ca_of "$x")" \
    --group "$g" --namespace shop --service-account "$g" --network "$(network "$x")" \
    --out "$dir/bundle" >/dev/null
  local tunnel=()
  case $transport in
  sni) tunnel=(--tunnel-port 0) ;;
  quic | h2) tunnel=(--tunnel-transports "$transport") ;;
  esac
  say "starting isthmus-vm-agent in $(ns_vm "$x") (group $g, network $(network "$x")${tunnel[*]:+, ${tunnel[*]}}), log $logs/agent-$x.log"
  start "agent-$x" "$(ns_vm "$x")" "$bin/isthmus-vm-agent" run --bundle "$dir/bundle" \
    --state-dir "$dir/state" --admin-addr 127.0.0.1:15000 --health-addr 0.0.0.0:15021 "${tunnel[@]}"
}

# The transport agent A's connections to reviews took (isthmus_tcp_connections_opened_total's
# label: quic-gateway, hbone-gateway or sni-gateway), the one of the most connections.
transport_taken() {
  in_ns isthmus-vm-a curl -fsS --max-time 2 http://127.0.0.1:15000/metrics 2>/dev/null |
    grep '^isthmus_tcp_connections_opened_total{' | grep 'destination_service="reviews' |
    sed -n 's/.*transport="\([^"]*\)".*} \([0-9.e+]*\)$/\2 \1/p' | sort -g | tail -n 1 | cut -d' ' -f2
}

vm_http_ok() { in_ns "$(ns_vm "$1")" curl -fsS --max-time 2 -o /dev/null "$2"; }
# The VM reaches the registry (the first of a set) through its network (bash's /dev/tcp:
# nothing to install).
vm_reaches_registry() {
  local set first
  set=$(reg_of "$1")
  first=${set%%,*}
  in_ns "$(ns_vm "$1")" timeout 3 bash -c "exec 3<>/dev/tcp/${first%:*}/${first##*:}"
}

# The records of a JSON array (or of an object's "connections" array), one per line: with
# jq where it is installed, else with sed for an array of flat objects. Then a string field
# of one record.
json_records() {
  if command -v jq >/dev/null 2>&1; then
    jq -c '(if type == "array" then . else (.connections // []) end)[]' 2>/dev/null
  else
    tr -d '\n' | sed 's/^[[:space:]]*\[//; s/\][[:space:]]*$//; s/}[[:space:]]*,[[:space:]]*{/}\n{/g'
    echo
  fi
}
json_field() { sed -n "s/.*\"$1\"[[:space:]]*:[[:space:]]*\"\\([^\"]*\\)\".*/\\1/p"; }

# call_until VM URL WORDS: VM's curl of URL until the answer holds WORDS (or
# ready_timeout passes); prints the answer, or nothing (curl's error is in curl.err).
call_until() {
  local deadline=$((SECONDS + ready_timeout)) answer
  while [ $SECONDS -lt $deadline ]; do
    if answer=$(in_ns "$(ns_vm "$1")" curl -sS --max-time 5 "$2" 2>"$state/curl.err") &&
      grep -q "$3" <<<"$answer"; then
      printf '%s\n' "$answer"
      return
    fi
    sleep 1
  done
}

demo() {
  local url=http://reviews.shop.svc.cluster.local:9080/ answer="" err="" vip out_rec in_rec
  echo
  say "from VM A, by mesh name: ip netns exec isthmus-vm-a curl -sS $url"
  answer=$(call_until a "$url" "hello from vm-b")
  if [ -z "$answer" ]; then
    err=$(cat "$state/curl.err" 2>/dev/null)
    echo "quickstart: VM A could not call reviews within ${ready_timeout}s: ${err:-no answer from vm-b}" >&2
    log_tail agent-a 20
    log_tail gateway-b 10
    log_tail agent-b 20
    return 1
  fi
  printf '%s\n' "$answer" | sed 's/^/    /'

  if command -v dig >/dev/null 2>&1; then
    vip=$(in_ns isthmus-vm-a dig +short +time=2 +tries=1 reviews.shop.svc.cluster.local A | tail -n 1)
  else
    vip=$(in_ns isthmus-vm-a getent ahostsv4 reviews.shop.svc.cluster.local | awk 'NR == 1 { print $1 }')
  fi

  local conns_a conns_b ok='"result"[[:space:]]*:[[:space:]]*"ok"'
  # The call that answered (an earlier try may have found no endpoint yet), once both
  # agents have recorded it: a connection is recorded when it has closed on both sides.
  for _ in $(seq 20); do
    conns_a=$(in_ns isthmus-vm-a curl -fsS --max-time 2 http://127.0.0.1:15000/debug/connections 2>/dev/null || true)
    conns_b=$(in_ns isthmus-vm-b curl -fsS --max-time 2 http://127.0.0.1:15000/debug/connections 2>/dev/null || true)
    out_rec=$(json_records <<<"$conns_a" | grep '"direction"[[:space:]]*:[[:space:]]*"outbound"' | grep 'reviews' | grep "$ok" | tail -n 1 || true)
    in_rec=$(json_records <<<"$conns_b" | grep '"direction"[[:space:]]*:[[:space:]]*"inbound"' | grep "$ok" | tail -n 1 || true)
    [ -n "$out_rec" ] && [ -n "$in_rec" ] && break
    sleep 0.25
  done
  local server_id endpoint client_id from
  server_id=$(json_field peer_identity <<<"$out_rec")
  endpoint=$(json_field endpoint <<<"$out_rec")
  client_id=$(json_field peer_identity <<<"$in_rec")
  from=$(json_field client <<<"$in_rec")

  local taken gw_b
  taken=$(transport_taken)
  gw_b=$(gw_ip b)
  echo
  say "the path (transport: ${taken:-?})"
  echo "  reviews.shop.svc.cluster.local resolved on VM A (its agent answers DNS) to ${vip:-?}"
  if [ "$taken" = hbone-gateway ] || [ "$taken" = quic-gateway ]; then
    local over="HBONE: HTTP/2 over one mTLS connection on 15008/tcp"
    [ "$taken" = quic-gateway ] && over="QUIC: one mTLS QUIC connection on 15008/udp"
    cat <<EOF
  vm-a (network-a, $vm_ip): curl, unchanged, connects to ${vip:-the VIP}:9080
    → agent A captures it and opens a stream to reviews.shop.svc.cluster.local:9080 on its
      pooled tunnel to the gateway of network-b ($gw_b:15008, $over
      for every call, as agent A's own identity); inside the stream it originates the
      end-to-end mTLS as spiffe://$trust_domain/ns/shop/sa/frontend (server verified as ${server_id:-?})
    → gateway B ends the tunnel, not the inner mTLS: it routes the stream by its
      hostname:port and connects to vm-b ($vm_ip in network-b, the same address as vm-a's)
EOF
  else
    cat <<EOF
  vm-a (network-a, $vm_ip): curl, unchanged, connects to ${vip:-the VIP}:9080
    → agent A captures it, originates mTLS as spiffe://$trust_domain/ns/shop/sa/frontend
      (server verified as ${server_id:-?})
    → gateway of network-b ${endpoint:-$gw_b:15443} (SNI passthrough: routes by SNI, never decrypts)
    → gateway B connects to vm-b ($vm_ip in network-b, the same address as vm-a's)
EOF
  fi
  cat <<EOF
    → agent B accepts it${from:+ from ${from%:*}}, terminates mTLS (saw ${client_id:-?}),
      and forwards to the sample app on 127.0.0.1:9080
    → sample app: "$(head -n 1 <<<"$answer")"
EOF
  if [ -z "$out_rec" ] || [ -z "$in_rec" ]; then
    echo
    echo "  (the agents' /debug/connections did not have the expected records; raw:)"
    echo "  agent A: ${conns_a:-(nothing)}"
    echo "  agent B: ${conns_b:-(nothing)}"
  else
    echo
    echo "  agent A's outbound record: $out_rec"
    echo "  agent B's inbound record:  $in_rec"
  fi
}

# The registries of the set agent A's /config_dump says it follows (catalog and
# registration), one per line.
agent_a_follows() {
  in_ns isthmus-vm-a curl -fsS --max-time 2 http://127.0.0.1:15000/config_dump |
    grep -o '"registry"[[:space:]]*:[[:space:]]*"[^",]*"' | sed 's/.*"\([^"]*\)"$/\1/' | sort -u
}

# Whether agent A follows registries other than $1 only, with its catalog connected.
agent_a_moved_off() {
  local now
  now=$(agent_a_follows) || return 1
  [ -n "$now" ] && ! grep -qx "$1" <<<"$now" &&
    in_ns isthmus-vm-a curl -fsS --max-time 2 http://127.0.0.1:15000/config_dump | grep -q '"connected"[[:space:]]*:[[:space:]]*true'
}

# Stops the registry agent A follows and shows the mesh carrying on with the others.
ha_demo() {
  local url=http://reviews.shop.svc.cluster.local:9080/ followed i name="" answer now
  echo
  followed=$(agent_a_follows | head -n 1)
  [ -n "$followed" ] || die "agent A's /config_dump names no registry it follows"
  for i in "${regs[@]}"; do
    [ "$(reg_ip "$i"):15012" = "$followed" ] && name="registry-$i"
  done
  [ -n "$name" ] || die "agent A follows $followed, which is not one of the set"
  say "agent A follows $followed ($name); stopping it"
  stop_pid "$(live_pid "$name")" "$name"
  wait_for - "agent A following another registry of the set" agent_a_moved_off "$followed"
  now=$(agent_a_follows | paste -sd, -)
  say "agent A now follows $now; from VM A again: curl -sS $url"
  answer=$(call_until a "$url" "hello from vm-b")
  [ -n "$answer" ] || die "VM A could not call reviews after $name stopped: $(cat "$state/curl.err" 2>/dev/null)"
  printf '%s\n' "$answer" | sed 's/^/    /'
  echo "  (agent B and both gateways moved the same way: see each one's /config_dump)"
}

# `peered`: where reviews came from, cluster-b's registry stopped (the call still goes
# through on what cluster-a kept, marked stale) and started again.
peered_demo() {
  local url=http://reviews.shop.svc.cluster.local:9080/ answer
  echo
  say "cluster-a's registry imports reviews from cluster-b's: $bin/isthmusctl peers --admin $admin"
  "$bin/isthmusctl" peers --admin "$admin" | sed 's/^/    /'
  say "what it holds of reviews, with its origin: curl -s http://$admin/debug/resources"
  curl -fsS --max-time 2 "http://$admin/debug/resources" | tr '{' '\n' | grep 'reviews' | grep -o '"key":"[^"]*","kind":"[^"]*","origin":"[^"]*"' | sed 's/^/    /'
  echo
  say "stopping cluster-b's registry"
  stop_pid "$(live_pid registry-b)" registry-b
  wait_for - "cluster-a's registry marking cluster-b stale" peer_is_stale
  "$bin/isthmusctl" peers --admin "$admin" | sed 's/^/    /'
  say "from VM A again, with cluster-b's registry down: curl -sS $url"
  answer=$(call_until a "$url" "hello from vm-b")
  [ -n "$answer" ] || die "VM A could not call reviews with cluster-b's registry down: $(cat "$state/curl.err" 2>/dev/null)"
  printf '%s\n' "$answer" | sed 's/^/    /'
  start_registry_b
  wait_for - "cluster-a's registry current with cluster-b again" peer_is_synced
  say "cluster-b's registry is back; cluster-a's import is current again:"
  "$bin/isthmusctl" peers --admin "$admin" | sed 's/^/    /'
}
peer_is_stale() { "$bin/isthmusctl" peers --admin "$admin" | grep -q 'stale for'; }
peer_is_synced() { "$bin/isthmusctl" peers --admin "$admin" | sed -n 2p | grep -q ' synced '; }

# The command that GETs PATH from a registry's admin port, from this shell (in the HA set,
# a running one's: its admin listens on the loopback of its namespace).
registry_admin() {
  local i live=0
  if [ "$flavour" = ha ]; then
    for i in "${regs[@]}"; do
      if running "registry-$i"; then
        live=$i
        break
      fi
    done
    echo "ip netns exec $(ns_reg "$live") curl -s 'http://127.0.0.1:15014$1'"
  else
    echo "curl -s 'http://$admin$1'"
  fi
}
registry_logs() {
  if [ "$flavour" = ha ]; then
    echo "etcd-0,etcd-1,etcd-2,registry-0,registry-1,registry-2,"
  elif [ "$flavour" = peered ]; then
    echo "registry,registry-b,"
  else
    echo "registry,"
  fi
}

print_help() {
  cat <<EOF

The local mesh keeps running. Poke around (as root):
  VMs call services by name (the agent answers DNS and captures the connection):
    ip netns exec isthmus-vm-a curl -s http://reviews.shop.svc.cluster.local:9080/
    ip netns exec isthmus-vm-b curl -s http://frontend.shop.svc.cluster.local:9080/
    ip netns exec isthmus-vm-a dig reviews.shop.svc.cluster.local
    ip netns exec isthmus-vm-a bash          (a shell on VM A)
  The agents (admin on 127.0.0.1:15000, metrics on :15020, health on :15021, inside each VM):
    ip netns exec isthmus-vm-a curl -s http://127.0.0.1:15000/debug/connections
    ip netns exec isthmus-vm-b curl -s http://127.0.0.1:15021/healthz/ready
    ip netns exec isthmus-vm-a nft list ruleset
  The registry and the gateways, from this shell:
    $(registry_admin "/debug/catalog?network=network-a")
    $(registry_admin /debug/registrations)
    ip netns exec isthmus-net-b curl -s http://127.0.0.1:15000/config_dump
    curl -s http://$(gw_ip b):15020/metrics
    $bin/isthmusctl catalog --registry $grpc \\
      --root $state/ca/root-cert.pem --cert-dir $state/gateway-a --network network-a
  Who talks to whom (VM A's agent and both gateways, read from network A; -o dot for Graphviz):
    ip netns exec isthmus-net-a $bin/isthmusctl graph \\
      --metrics http://$vm_ip:15020/metrics,http://$(gw_ip a):15020/metrics,http://$(gw_ip b):15020/metrics
  deploy/quickstart.sh status        (as root)
Logs: $logs/{$(registry_logs)gateway-a,gateway-b,app-a,app-b,agent-a,agent-b}.log
The live catalog is in $state/resources/ (the registry re-reads it when it changes).
Tear everything down with (as root): deploy/quickstart.sh down
EOF
}

on_up_exit() {
  local rc=$?
  if [ "$rc" -ne 0 ] && [ -d "$state" ]; then
    echo >&2
    echo "quickstart: up failed; what it started is left as it is for a look (logs in $logs)." >&2
    echo "Remove it all with (as root): deploy/quickstart.sh down" >&2
  fi
}

up() {
  require_root
  require_tools
  if [ ! -e /proc/self/ns/net ]; then
    die "this kernel has no network namespaces"
  fi
  [[ $wan =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] ||
    die "ISTHMUS_WAN_PREFIX must be the first three octets of a /24 (like 198.18.0), not $wan"
  case $transport in
  auto | tunnel | quic | h2 | sni) ;;
  *) die "ISTHMUS_TRANSPORT must be auto (the default: QUIC raced against HTTP/2 through the gateways' tunnels), quic, h2 or sni (SNI passthrough), not $transport" ;;
  esac
  if already_up; then
    status
    die "the local mesh is already up (or left over from a failed run): run 'deploy/quickstart.sh down' (as root) first"
  fi
  if [ "$flavour" = ha ] && ! command -v etcd >/dev/null 2>&1; then
    die "the HA set of registries runs on etcd, which is not installed: on Debian/Ubuntu apt-get install etcd-server"
  fi
  build
  check_binaries
  if [ "$flavour" = kubernetes ]; then
    kube_build
  fi

  mkdir -p "$pids" "$logs"
  trap on_up_exit EXIT
  render_catalog
  local clusters=(--cluster "$cluster")
  if [ "$flavour" = peered ]; then
    clusters+=(--cluster cluster-b)
  fi
  say "creating the mesh CA (trust domain $trust_domain, ${clusters[*]})"
  "$bin/isthmusctl" ca init --trust-domain "$trust_domain" "${clusters[@]}" --out "$state/ca" >/dev/null
  "$bin/isthmus-registry" --cluster "$cluster" --network network-a --ca-dir "$state/ca/$cluster" \
    --data-dir "$state/data" --resources "$state/resources" --validate >"$logs/validate.log" 2>&1 || {
    cat "$logs/validate.log" >&2
    die "the catalog in $state/resources is invalid (rendered from deploy/examples/mesh)"
  }
  if [ "$flavour" = peered ]; then
    "$bin/isthmus-registry" --cluster cluster-b --network network-b --ca-dir "$state/ca/cluster-b" \
      --data-dir "$state/data-b" --resources "$state/resources-b" --validate >"$logs/validate-b.log" 2>&1 || {
      cat "$logs/validate-b.log" >&2
      die "the catalog in $state/resources-b is invalid (rendered from deploy/examples/mesh)"
    }
  fi

  make_namespaces
  if [ "$flavour" = kubernetes ]; then
    kube_start
    kube_objects
  fi
  if [ "$flavour" = ha ]; then
    make_registry_namespaces
    start_registry_set
  else
    start_registry
  fi
  local x
  for x in "${nets[@]}"; do start_gateway "$x"; done
  for x in "${nets[@]}"; do
    wait_for "gateway-$x" "GET http://$(gw_ip "$x"):15021/healthz/ready" \
      http_ok "http://$(gw_ip "$x"):15021/healthz/ready"
  done
  for x in "${nets[@]}"; do
    wait_for - "VM $x reaching the registry at $(reg_of "$x")" vm_reaches_registry "$x"
    start_app "$x"
  done
  for x in "${nets[@]}"; do
    wait_for "app-$x" "the sample app answering on VM $x" vm_http_ok "$x" http://127.0.0.1:9080/
  done
  for x in "${nets[@]}"; do start_agent "$x"; done
  for x in "${nets[@]}"; do
    wait_for "agent-$x" "GET http://127.0.0.1:15021/healthz/ready in $(ns_vm "$x")" \
      vm_http_ok "$x" http://127.0.0.1:15021/healthz/ready
  done
  demo
  if [ "$flavour" = kubernetes ]; then
    kube_demo
  fi
  if [ "$flavour" = ha ]; then
    ha_demo
  fi
  if [ "$flavour" = peered ]; then
    peered_demo
  fi
  print_help
}

flavour=files
# shellcheck source=deploy/quickstart-kubernetes.sh
. "$root/deploy/quickstart-kubernetes.sh"

case "${1:-up}" in
up) up ;;
kubernetes)
  flavour=kubernetes
  up
  ;;
ha)
  flavour=ha
  grpc=$(registry_set)
  up
  ;;
peered)
  flavour=peered
  up
  ;;
down) down ;;
status) status ;;
-h | --help | help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' ;;
*) die "unknown command '$1': use up (the default), kubernetes, ha, peered, down or status" ;;
esac
