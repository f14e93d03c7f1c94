#!/usr/bin/env bash
# The real Kubernetes control plane the operator's tests run against.
#
#   scripts/control-plane.sh build       build, once, and cache under ~/.cache/pretrain/k8s-v1.37.2/bin:
#                                        kube-apiserver, kube-controller-manager, kube-scheduler and
#                                        kubectl (k8s.io/kubernetes), etcd (go.etcd.io/etcd/server/v3),
#                                        helm (helm.sh/helm/v4) and kueue (sigs.k8s.io/kueue), from the
#                                        Go modules pinned in tests/controlplane/*/go.mod; prints what
#                                        it built
#   scripts/control-plane.sh up [NODES]  start the control plane, the test kubelet with NODES fake GPU
#                                        nodes (default 2) and the operator from the Helm chart; prints
#                                        a KUBECONFIG path with which `kubectl apply -f run.yaml` works
#   scripts/control-plane.sh down        stop all of it
#   scripts/control-plane.sh path        print the binaries' directory
#
# Needs Go (1.26) and the Go module proxy; `up` needs root (the test kubelet makes network namespaces
# and chroots pods into their images' roots). See docs/testing.md.
set -euo pipefail
cd "$(dirname "$0")/.."

KUBERNETES=v1.37.2
CACHE=${PRETRAIN_CACHE:-$HOME/.cache/pretrain}
BIN=${PRETRAIN_K8S_BIN:-$CACHE/k8s-$KUBERNETES/bin}
STATE=${PRETRAIN_CLUSTER_DIR:-$CACHE/cluster}
MODULES=tests/controlplane

# The version a module's go.mod pins for `dep`.
pinned() { awk -v m="$2" '$1 == m { print $2; exit } $1 == "require" && $2 == m { print $3; exit }' "$MODULES/$1/go.mod"; }

# A stamp of what the cached binaries were built from: the go.mod and go.sum files and Go's version.
stamp() { { cat "$0" "$MODULES"/*/go.mod "$MODULES"/*/go.sum; go version; } | sha256sum | cut -c1-16; }

build() {
    command -v go >/dev/null || { echo "control-plane.sh: Go is not installed (needs go 1.26)" >&2; exit 1; }
    local want
    want=$(stamp)
    if [[ -f $BIN/.stamp && $(cat "$BIN/.stamp") == "$want" ]]; then
        echo "control plane: cached in $BIN"
        return
    fi
    mkdir -p "$BIN"
    rm -f "$BIN/.stamp"
    # Static, stripped binaries. The compiled packages go to a build cache of our own, removed once
    # the binaries are cached: it holds several GB that only a change of a pinned version would reuse.
    # -mod=readonly: the go.sum files pin every module; -buildvcs=false: no VCS stamp from our repository.
    export CGO_ENABLED=0 GOFLAGS="-mod=readonly -buildvcs=false" GOCACHE=$CACHE/go-build
    local flags=(-trimpath)
    local started=$SECONDS
    # The version stamps Kubernetes' own build sets (hack/lib/version.sh), so that the servers and
    # kubectl report the release they are.
    local k8s minor x
    k8s=$(pinned kubernetes k8s.io/kubernetes)
    minor=$(echo "$k8s" | cut -d. -f2)
    x=""
    for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
        x+=" -X $pkg.gitVersion=$k8s -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
        x+=" -X $pkg.buildDate=1970-01-01T00:00:00Z"
    done
    (cd "$MODULES/kubernetes" && go build "${flags[@]}" -ldflags="-s -w$x" -o "$BIN/" \
        k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
        k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl)
    (cd "$MODULES/etcd" && go build "${flags[@]}" -ldflags="-s -w" -o "$BIN/etcd" .)
    local helm
    helm=$(pinned helm helm.sh/helm/v4)
    (cd "$MODULES/helm" && go build "${flags[@]}" -ldflags="-s -w -X helm.sh/helm/v4/internal/version.version=$helm" \
        -o "$BIN/" helm.sh/helm/v4/cmd/helm)
    local kueue
    kueue=$(pinned kueue sigs.k8s.io/kueue)
    x="-X sigs.k8s.io/kueue/pkg/version.GitVersion=$kueue -X sigs.k8s.io/kueue/pkg/version.BuildDate=1970-01-01T00:00:00Z"
    (cd "$MODULES/kueue" && go build "${flags[@]}" -ldflags="-s -w $x" -o "$BIN/" sigs.k8s.io/kueue/cmd/kueue)
    # Kueue's CRDs, from the same module (its kustomize patches add conversion webhooks: not those).
    rm -rf "$BIN/kueue-crds" && mkdir -p "$BIN/kueue-crds"
    cp "$(cd "$MODULES/kueue" && go env GOMODCACHE)/sigs.k8s.io/kueue@$kueue/config/components/crd/bases/"*.yaml \
        "$BIN/kueue-crds/"
    chmod u+w "$BIN/kueue-crds/"*.yaml
    echo "$want" >"$BIN/.stamp"
    rm -rf "$GOCACHE"
    echo "control plane: built in $((SECONDS - started)) s into $BIN:"
    echo "  kube-apiserver, kube-controller-manager, kube-scheduler, kubectl  k8s.io/kubernetes $(pinned kubernetes k8s.io/kubernetes)"
    echo "  etcd  go.etcd.io/etcd/server/v3 $(pinned etcd go.etcd.io/etcd/server/v3)"
    echo "  helm  helm.sh/helm/v4 $(pinned helm helm.sh/helm/v4)"
    echo "  kueue  sigs.k8s.io/kueue $(pinned kueue sigs.k8s.io/kueue)"
    "$BIN/kubectl" version --client
    "$BIN/helm" version --short
}

up() {
    local nodes=${1:-2}
    build >/dev/null
    if [[ -f $STATE/pid ]] && kill -0 "$(cat "$STATE/pid")" 2>/dev/null; then
        echo "control-plane.sh: a cluster is already up (pid $(cat "$STATE/pid")); run down first" >&2
        exit 1
    fi
    cargo build --quiet -p pretrain-testcluster -p pretrain-operator -p pretrain-worker --bins
    rm -rf "$STATE"
    mkdir -p "$STATE"
    PRETRAIN_K8S_BIN=$BIN nohup target/debug/pretrain-testcluster up --dir "$STATE" --nodes "$nodes" \
        --with-operator target/debug >"$STATE/cluster.log" 2>&1 &
    echo $! >"$STATE/pid"
    for _ in $(seq 1 300); do
        if [[ -f $STATE/kubeconfig-path ]]; then
            echo "cluster up with $nodes fake GPU nodes and the operator; logs under $STATE"
            echo "export KUBECONFIG=$(cat "$STATE/kubeconfig-path")"
            return
        fi
        if ! kill -0 "$(cat "$STATE/pid")" 2>/dev/null; then
            echo "control-plane.sh: the cluster did not start:" >&2
            tail -30 "$STATE/cluster.log" >&2
            exit 1
        fi
        sleep 1
    done
    echo "control-plane.sh: no cluster after 300 s; see $STATE/cluster.log" >&2
    exit 1
}

down() {
    [[ -f $STATE/pid ]] || { echo "no cluster is up"; return; }
    local pid
    pid=$(cat "$STATE/pid")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 60); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$STATE/pid"
    echo "cluster stopped"
}

case ${1:-} in
    build) build ;;
    up) up "${2:-2}" ;;
    down) down ;;
    path) echo "$BIN" ;;
    *) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
