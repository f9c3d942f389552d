#!/usr/bin/env bash
# An emulated AArch64 machine on this x86-64 host, serving TVM's RPC on 127.0.0.1.
#
#   tools/arm_rpc.sh up [--tracker] [--servers N]   build the root if needed, start, wait until ready
#   tools/arm_rpc.sh down [--tracker | --server]    stop what `up` started (or only that mode's), unmount
#   tools/arm_rpc.sh status                         what runs; exit 0 when a bench is up
#   tools/arm_rpc.sh root                           only install the tools and build the cached root
#
# `up` starts one RPC server on $TVMS_ARM_PORT; `up --tracker` starts an RPC tracker on
# $TVMS_ARM_TRACKER_PORT (on the host, as it would run for a real board: it only pairs clients
# with servers) and N (default 2) emulated servers registered under key $TVMS_ARM_KEY (what
# `tvm-sparseconv tune --rpc-tracker` and MetaSchedule's RPCRunner use). Both may run at once.
# Every command is idempotent: `up` reuses what already runs, `down` on a stopped bench does nothing.
#
# The root: Debian bookworm arm64 (debootstrap minbase + python3), a venv /opt/tvm in it with
# apache-tvm and its runtime's dependencies from aarch64 wheels that pip downloads on the host (the
# host's versions of each package, so that both ends speak the same RPC). Binaries run through
# qemu-user-static (binfmt_misc). Built once, 5-10 minutes, and cached in $TVMS_ARM_ROOT;
# `rm -rf` it to rebuild. Needs root (apt-get, debootstrap, mount, chroot).
#
# Environment (defaults):
#   TVMS_ARM_ROOT          ${XDG_CACHE_HOME:-~/.cache}/tvm_sparseconv/arm64-root
#   TVMS_ARM_PORT          9190    the plain server
#   TVMS_ARM_TRACKER_PORT  9290    the tracker; its servers listen from TVMS_ARM_PORT + 1 on
#   TVMS_ARM_KEY           arm64   the tracker key of its servers
#   TVMS_ARM_TIMEOUT       600     seconds `up` waits for the servers (TVM's import is slow under qemu)
#   TVMS_ARM_PYTHON        python3 the host's Python with TVM (the versions to install, the tracker)
set -euo pipefail

CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/tvm_sparseconv"
ROOT="${TVMS_ARM_ROOT:-$CACHE/arm64-root}"
WHEELS="$ROOT.wheels"
RUN="$ROOT.run"                   # pid files and logs of what runs
PORT="${TVMS_ARM_PORT:-9190}"
TRACKER_PORT="${TVMS_ARM_TRACKER_PORT:-9290}"
KEY="${TVMS_ARM_KEY:-arm64}"
TIMEOUT="${TVMS_ARM_TIMEOUT:-600}"
SUITE=bookworm
PY=/opt/tvm/bin/python            # inside the root
# the root's Python is bookworm's 3.11: the wheels are for it
WHEEL_PLATFORM=(--platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64
                --platform manylinux2014_aarch64 --python-version 3.11 --implementation cp)
PACKAGES=(apache-tvm apache-tvm-ffi numpy ml_dtypes typing_extensions psutil cloudpickle tornado)
HOST_PYTHON="${TVMS_ARM_PYTHON:-python3}"

say() { echo "arm_rpc: $*" >&2; }
die() { say "error: $*"; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "$1 needs root (apt-get, debootstrap, mount, chroot)"; }

install_tools() {
    local missing=()
    command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    command -v aarch64-linux-gnu-gcc >/dev/null || missing+=(gcc-aarch64-linux-gnu)
    [ ${#missing[@]} = 0 ] && return
    need_root "installing ${missing[*]}"
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# binfmt_misc runs arm64 ELF files through qemu; the F flag opens the interpreter when registered,
# so that it works inside the chroot, where /usr/libexec/qemu-binfmt does not exist
register_binfmt() {
    local bm=/proc/sys/fs/binfmt_misc
    [ -e "$bm/register" ] || mount -t binfmt_misc binfmt_misc "$bm" \
        || die "cannot mount binfmt_misc (a container without it cannot run arm64 binaries)"
    if [ ! -e "$bm/qemu-aarch64" ]; then
        local conf=/usr/lib/binfmt.d/qemu-aarch64.conf
        [ -r "$conf" ] || die "$conf is missing (is qemu-user-static installed?)"
        cat "$conf" > "$bm/register" || die "cannot register qemu-aarch64 with binfmt_misc"
    fi
    [ "$(head -1 "$bm/qemu-aarch64")" = enabled ] || echo 1 > "$bm/qemu-aarch64"
}

host_versions() {  # PKG==VERSION for each package the host has, PKG for the others
    "$HOST_PYTHON" - "${PACKAGES[@]}" <<'EOF'
import sys
from importlib import metadata
for p in sys.argv[1:]:
    try:
        print(f"{p}=={metadata.version(p)}")
    except metadata.PackageNotFoundError:
        print(p)
EOF
}

# in_root CMD...: CMD inside the root, with a clean environment (the host's PIP_* or PYTHON*
# settings name host paths)
in_root() { chroot "$ROOT" /usr/bin/env -i PATH=/opt/tvm/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 "$@"; }

build_root() {
    install_tools
    register_binfmt
    if [ ! -e "$ROOT/.tvms-debootstrap" ]; then
        need_root "debootstrap"
        say "debootstrap $SUITE arm64 into $ROOT (about 6 minutes)"
        rm -rf "$ROOT"
        mkdir -p "$(dirname "$ROOT")"
        debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,ca-certificates \
            "$SUITE" "$ROOT" > "$ROOT.debootstrap.log" 2>&1 \
            || die "debootstrap failed: see $ROOT.debootstrap.log (and $ROOT/debootstrap/debootstrap.log)"
        touch "$ROOT/.tvms-debootstrap"
    fi
    local pins
    pins="$(host_versions | tr '\n' ' ')"
    if [ "$(cat "$ROOT/.tvms-venv" 2>/dev/null)" != "$pins" ]; then
        say "downloading aarch64 wheels: $pins"
        mkdir -p "$WHEELS"
        # shellcheck disable=SC2086
        "$HOST_PYTHON" -m pip download -q --only-binary=:all: "${WHEEL_PLATFORM[@]}" -d "$WHEELS" $pins \
            || die "pip download of the aarch64 wheels failed"
        say "installing them into a venv in the root (about 3 minutes under emulation)"
        rm -rf "$ROOT/opt/tvm" "$ROOT/wheels"
        cp -r "$WHEELS" "$ROOT/wheels"
        in_root /usr/bin/python3 -m venv /opt/tvm
        # shellcheck disable=SC2086
        in_root $PY -m pip install -q --no-index --find-links /wheels $pins \
            || die "installing the wheels in the root failed"
        rm -rf "$ROOT/wheels"
        in_root $PY -c "import tvm, tvm.rpc, numpy" || die "TVM does not import in the root"
        echo "$pins" > "$ROOT/.tvms-venv"
    fi
}

mount_root() {
    mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
    mountpoint -q "$ROOT/dev" || mount --bind /dev "$ROOT/dev"
}

unmount_root() {
    local m
    for m in dev proc; do
        if mountpoint -q "$ROOT/$m" 2>/dev/null; then
            umount "$ROOT/$m" 2>/dev/null || umount -l "$ROOT/$m"
        fi
    done
}

alive() { [ -s "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }

# start NAME ARGS...: python ARGS in the root, in its own session (so `down` stops its children)
start() {
    local name=$1
    shift
    alive "$name" && return
    setsid chroot "$ROOT" /usr/bin/env -i PATH=/opt/tvm/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 \
        $PY "$@" > "$RUN/$name.log" 2>&1 < /dev/null &
    echo $! > "$RUN/$name.pid"
}

start_host() {  # start_host NAME ARGS...: the host's Python, as start
    local name=$1
    shift
    alive "$name" && return
    setsid "$HOST_PYTHON" "$@" > "$RUN/$name.log" 2>&1 < /dev/null &
    echo $! > "$RUN/$name.pid"
}

stop() {
    local pid
    alive "$1" || { rm -f "$RUN/$1.pid"; return; }
    pid=$(cat "$RUN/$1.pid")
    kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 -- "-$pid" 2>/dev/null || true
    rm -f "$RUN/$1.pid"
}

names() { ls "$RUN" 2>/dev/null | sed -n 's/\.pid$//p'; }

# wait_ready CHECK...: poll the host-side CHECK (python code) until it succeeds or TIMEOUT passes
wait_ready() {
    local what=$1 code=$2 t0=$SECONDS
    until "$HOST_PYTHON" -c "$code" 2>/dev/null; do
        for n in $(names); do
            alive "$n" || die "$n exited: $(tail -3 "$RUN/$n.log" 2>/dev/null | tr '\n' ' ')"
        done
        (( SECONDS - t0 < TIMEOUT )) || die "$what not ready after $TIMEOUT s (logs in $RUN)"
        sleep 2
    done
    say "$what ready after $((SECONDS - t0)) s"
}

cmd_up() {
    local tracker=0 servers=2
    while [ $# -gt 0 ]; do
        case $1 in
            --tracker) tracker=1 ;;
            --servers) servers=$2; shift ;;
            *) die "unknown option $1" ;;
        esac
        shift
    done
    need_root "up"
    build_root
    mount_root
    mkdir -p "$RUN"
    if [ $tracker = 1 ]; then
        # the tracker only pairs clients with servers: it runs on the host, as it would for a real board
        start_host tracker -m tvm.exec.rpc_tracker --host 127.0.0.1 --port "$TRACKER_PORT" --port-end "$((TRACKER_PORT + 1))"
        wait_ready "tracker on 127.0.0.1:$TRACKER_PORT" \
            "from tvm import rpc; rpc.connect_tracker('127.0.0.1', $TRACKER_PORT).close()"
        for i in $(seq "$servers"); do
            start "tracked-$i" -m tvm.exec.rpc_server --host 127.0.0.1 --port "$((PORT + i))" \
                --port-end "$((PORT + i + 1))" --tracker "127.0.0.1:$TRACKER_PORT" --key "$KEY"
        done
        wait_ready "$servers servers under key $KEY" "
from tvm import rpc
t = rpc.connect_tracker('127.0.0.1', $TRACKER_PORT)
q = t.summary()['queue_info']
assert q.get('$KEY', {}).get('free', 0) >= $servers, q"
        echo "tracker=127.0.0.1:$TRACKER_PORT key=$KEY"
    else
        start server -m tvm.exec.rpc_server --host 127.0.0.1 --port "$PORT" --port-end "$((PORT + 1))"
        wait_ready "server on 127.0.0.1:$PORT" "
from tvm import rpc
assert rpc.connect('127.0.0.1', $PORT, session_timeout=60).cpu().exist"
        echo "server=127.0.0.1:$PORT"
    fi
}

cmd_down() {
    local n pattern='.*'
    case "${1:-}" in
        --tracker) pattern='^(tracker|tracked-[0-9]+)$' ;;
        --server) pattern='^server$' ;;
        "") ;;
        *) die "unknown option $1" ;;
    esac
    for n in $(names | grep -E "$pattern" || true); do stop "$n"; done
    # the root stays mounted while a server of the other mode runs in it
    if [ -z "$(names)" ] && [ -d "$ROOT" ]; then unmount_root; fi
    say "down${1:+ ($1)}"
}

cmd_status() {
    local up=1 n
    if [ -e "$ROOT/.tvms-venv" ]; then echo "root: $ROOT ($(cat "$ROOT/.tvms-venv"))"; else echo "root: not built ($ROOT)"; fi
    for n in $(names); do
        if alive "$n"; then echo "$n: running (pid $(cat "$RUN/$n.pid"))"; up=0; else echo "$n: dead (log $RUN/$n.log)"; fi
    done
    return $up
}

case "${1:-}" in
    up) shift; cmd_up "$@" ;;
    down) shift; cmd_down "$@" ;;
    status) cmd_status ;;
    root) need_root "root"; build_root; say "root ready: $ROOT" ;;
    *) sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
