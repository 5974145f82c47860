#!/usr/bin/env bash
# Builds the Kubernetes peers the tests start -- kube-apiserver, kubectl (k8s.io/kubernetes,
# the release go.mod pins) and a single-member etcd (./etcd) -- into OUT (default: the
# workspace's target/kube). Test support only: nothing here ships.
#
# Safe to run from several processes at once (parallel test binaries, CI): the build holds
# an exclusive lock on OUT/.lock, is skipped when every binary is newer than this module's
# inputs (go.mod, go.sum, tools.go, etcd/main.go, this script), and writes into a private
# temporary directory whose binaries are then renamed into place, so a reader never sees a
# half-written file. Go's own build cache (GOCACHE) makes a rebuild after `git pull` cheap.
set -euo pipefail
module="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$module/../../target/kube}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
binaries=(kube-apiserver kubectl etcd)
inputs=("$module/go.mod" "$module/go.sum" "$module/tools.go" "$module/etcd/main.go" "$module/build.sh")

fresh() {
  local b i
  for b in "${binaries[@]}"; do
    [ -x "$out/$b" ] || return 1
    for i in "${inputs[@]}"; do
      [ "$out/$b" -nt "$i" ] || return 1
    done
  done
}

if ! command -v go >/dev/null 2>&1; then
  echo "tests/kube/build.sh: go is not installed; install Go >= $(sed -n 's/^go //p' "$module/go.mod") to build the Kubernetes test peers" >&2
  exit 127
fi

exec 9>"$out/.lock"
flock 9
if fresh; then
  exit 0
fi
tmp="$(mktemp -d "$out/.build.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
cd "$module"
# Stamp the release into the binaries as Kubernetes' own build does, so /version and
# `kubectl version` say v1.x.y rather than v0.0.0-master.
release="$(go list -m -f '{{.Version}}' k8s.io/kubernetes)"
minor="${release#v*.}"
minor="${minor%%.*}"
v=k8s.io/component-base/version
go build -trimpath -o "$tmp/" \
  -ldflags "-X $v.gitVersion=$release -X $v.gitMajor=1 -X $v.gitMinor=$minor -X $v.gitTreeState=clean" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl ./etcd
for b in "${binaries[@]}"; do
  mv -f "$tmp/$b" "$out/$b"
done
