#!/usr/bin/env bash
# Builds the Go and Node examples, starts a throwaway server (`nexus-data serve`: SQLite in a
# temporary directory, a free port on 127.0.0.1), runs both examples against it with the admin
# key its first start wrote, and stops it. Exits non-zero when a build or an example fails.
#
#   examples/run.sh              everything (CI runs this: .ci/run)
#   examples/run.sh go|node      one example only
#
# Needs: go (1.19 or later), node (18 or later) and npm, and nexus-data (.venv/bin/nexus-data
# when the repository's virtualenv exists, else on PATH).
#
# Go modules: where Debian's Go packages are installed (/usr/share/gocode/src holds grpc,
# protobuf and genproto: the packages .ci/run installs), the Go example is built offline against
# them, through a temporary go.work that replaces each module by Debian's source. Elsewhere (or
# with NEXUS_GO_DEBIAN=0) it is an ordinary module build: the Go module proxy fetches the
# versions examples/go/go.mod names and go.sum is written then.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
readonly ROOT=$PWD
readonly START_S=$SECONDS
WHICH=${1:-all}
case $WHICH in all | go | node) ;; *) echo "usage: $0 [all|go|node]" >&2; exit 2 ;; esac

TMP_DIR=$(mktemp -d "${TMPDIR:-/tmp}/nexus-examples.XXXXXX")
SERVER_PID=
cleanup() {
    local rc=$?
    if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    if [[ $rc -ne 0 && -f $TMP_DIR/server.log ]]; then
        echo "--- server log (last 40 lines) ---" >&2
        tail -n 40 "$TMP_DIR/server.log" >&2
    fi
    rm -rf "$TMP_DIR"
    exit "$rc"
}
trap cleanup EXIT

step() { printf '\n--> [%3d s] %s\n' "$((SECONDS - START_S))" "$*"; }
fail() { printf 'ERROR: %s\n' "$*" >&2; exit 1; }

# --- builds -----------------------------------------------------------------------------------
readonly DEBIAN_GO=/usr/share/gocode/src
# The modules the generated client and the example need, as Debian packages them.
readonly DEBIAN_MODULES=(google.golang.org/grpc google.golang.org/protobuf google.golang.org/genproto
    github.com/golang/protobuf golang.org/x/net golang.org/x/sys golang.org/x/text github.com/google/go-cmp)

# A go.work that uses examples/go and gen/go and replaces every module they need by Debian's
# source. Each replacement is a directory of links to Debian's files with a go.mod of its own
# that requires only the others: the go.mod files Debian ships name the whole upstream module
# graph (linters, xDS, cloud SDKs), which is not installed and could not be fetched.
# The replacements live in a fixed place outside the checkout, made again only when Debian's
# packages change: Go's build cache keys on source paths, so a fixed path keeps the next
# build, from any clone, fast.
debian_go_work() {
    local cache=${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/nexus-data/go-debian
    local stamp m o entry replaces=""
    stamp=$(printf '%s\n' "${DEBIAN_MODULES[@]}"; ls -ld --time-style=+%s "${DEBIAN_MODULES[@]/#/$DEBIAN_GO/}")
    if [[ ! -f $cache/stamp || $(cat "$cache/stamp") != "$stamp" ]]; then
        local fresh=$cache.$$
        rm -rf "$fresh"
        for m in "${DEBIAN_MODULES[@]}"; do
            [[ -f $DEBIAN_GO/$m/go.mod ]] || fail "$DEBIAN_GO/$m is missing: apt-get install the Go packages .ci/run lists"
            mkdir -p "$fresh/$m"
            for entry in "$DEBIAN_GO/$m"/*; do
                [[ $(basename "$entry") == go.mod ]] || ln -s "$entry" "$fresh/$m/"
            done
            {
                echo "module $m"
                grep -m1 '^go ' "$DEBIAN_GO/$m/go.mod" || true
                echo "require ("
                for o in "${DEBIAN_MODULES[@]}"; do [[ $o == "$m" ]] || printf '\t%s v0.0.0\n' "$o"; done
                echo ")"
            } >"$fresh/$m/go.mod"
        done
        printf '%s' "$stamp" >"$fresh/stamp"
        rm -rf "$cache" && mv "$fresh" "$cache"
    fi
    for m in "${DEBIAN_MODULES[@]}"; do replaces+=$(printf '\t%s => %s' "$m" "$cache/$m")$'\n'; done
    printf 'go 1.19\n\nuse (\n\t%s\n\t%s\n)\n\nreplace (\n%s)\n' "$ROOT/examples/go" "$ROOT/gen/go" "$replaces" >"$TMP_DIR/go.work"
    echo "$TMP_DIR/go.work"
}

build_go() {
    step "go: build examples/go ($(go version | cut -d' ' -f3))"
    command -v go >/dev/null || fail "go is not installed (Debian: apt-get install golang-go and the packages .ci/run lists)"
    if [[ ${NEXUS_GO_DEBIAN:-1} != 0 && -d $DEBIAN_GO/google.golang.org/grpc ]]; then
        local work
        work=$(debian_go_work)
        echo "offline, against Debian's Go packages ($work)"
        (cd examples/go && GOWORK=$work GOPROXY=off GOSUMDB=off GOFLAGS= go build -o "$TMP_DIR/nexus-example-go" .)
    else
        (cd examples/go && GOFLAGS=-mod=mod go build -o "$TMP_DIR/nexus-example-go" .)
    fi
}

build_node() {
    step "node: npm ci in examples/node (node $(node --version))"
    command -v npm >/dev/null || fail "node and npm are not installed"
    # The lockfile pins every package; a node_modules installed from it is reused.
    if ! cmp -s examples/node/package-lock.json examples/node/node_modules/.package-lock.json.ci 2>/dev/null; then
        npm ci --prefix examples/node --no-audit --no-fund --loglevel=error
        cp examples/node/package-lock.json examples/node/node_modules/.package-lock.json.ci
    fi
    node --check examples/node/example.js
}

[[ $WHICH == node ]] || build_go
[[ $WHICH == go ]] || build_node

# --- the server -------------------------------------------------------------------------------
if [[ -x $ROOT/.venv/bin/nexus-data ]]; then NEXUS_DATA=$ROOT/.venv/bin/nexus-data; else NEXUS_DATA=$(command -v nexus-data) || fail "nexus-data not found: pip install -e . (or make .venv)"; fi
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
step "server: nexus-data serve on 127.0.0.1:$PORT, SQLite in $TMP_DIR"
# stdout is not a terminal, so the first start writes the admin key to NEXUS_BOOTSTRAP_KEY_FILE.
DB_PATH=$TMP_DIR/nexus.db NEXUS_BLOB_DIR=$TMP_DIR/blobs NEXUS_BOOTSTRAP_KEY_FILE=$TMP_DIR/admin-key \
    NEXUS_HOST=127.0.0.1 NEXUS_PORT=$PORT NEXUS_DRAIN_SECONDS=0 NEXUS_GRACE_SECONDS=2 \
    "$NEXUS_DATA" serve >"$TMP_DIR/server.log" 2>&1 &
SERVER_PID=$!
for ((i = 0; i < 300; i++)); do
    kill -0 "$SERVER_PID" 2>/dev/null || fail "nexus-data serve exited (log above)"
    if [[ -s $TMP_DIR/admin-key ]] && (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then break; fi
    sleep 0.1
done
(exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null || fail "the server did not listen on port $PORT within 30 s"
# The file holds one line, NEXUS_ADMIN_KEY=nx_...
NEXUS_API_KEY=$(sed -n 's/^NEXUS_ADMIN_KEY=//p' "$TMP_DIR/admin-key")
[[ -n $NEXUS_API_KEY ]] || fail "no NEXUS_ADMIN_KEY line in $TMP_DIR/admin-key"
export NEXUS_API_KEY NEXUS_ADDRESS=127.0.0.1:$PORT

# --- the examples -----------------------------------------------------------------------------
if [[ $WHICH != node ]]; then
    step "go: examples/go against $NEXUS_ADDRESS"
    "$TMP_DIR/nexus-example-go" || fail "the Go example failed (exit $?)"
fi
if [[ $WHICH != go ]]; then
    step "node: examples/node/example.js against $NEXUS_ADDRESS"
    node examples/node/example.js || fail "the Node example failed (exit $?)"
fi
step "examples passed"
