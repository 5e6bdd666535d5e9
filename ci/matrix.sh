#!/usr/bin/env bash
# Runs the test suite on each Python of the support matrix, each in a fresh
# virtual environment with the newest releases pip resolves for it (or, for
# "lowest", the lowest versions pyproject.toml allows).
#
#   ci/matrix.sh [--prepare] [--rebuild] ENTRY...
#
# ENTRY is one of
#   3.11    the host's python3.11, newest releases
#   3.12    the host's python3.12 (if it has one), newest releases
#   3.13    Python 3.13 of Debian 13 (trixie), in a chroot
#   3.14    Python 3.14 of Debian testing (forky), in a chroot
#   lowest  the host's python3.11, direct dependencies at their lower bounds
#           (uv pip compile --resolution lowest-direct of pyproject.toml)
#
# --prepare only makes (or checks) the chroots the entries need; --rebuild
# makes them anew. Runs as root (debootstrap, chroot, mount).
#
# Environment:
#   BLUESKY_ZARR_MATRIX_CACHE        where chroots and venvs live
#                                    (default /var/cache/bluesky-zarr/matrix)
#   BLUESKY_ZARR_MATRIX_MIRROR       Debian mirror (default http://deb.debian.org/debian)
#   BLUESKY_ZARR_MATRIX_CONSTRAINTS  requirement specifiers every install must
#                                    also satisfy, e.g. "zarr<3.2 icechunk<2"
#   BLUESKY_ZARR_MATRIX_PYTEST_ARGS  arguments for pytest (default: the whole suite)
#
# The working tree's files (tracked ones and new ones git does not ignore) are
# copied, so uncommitted changes are tested too. Exits non-zero if any entry
# fails: its install, its import, or its suite (no test collected counts as
# a failure).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${BLUESKY_ZARR_MATRIX_CACHE:-/var/cache/bluesky-zarr/matrix}
MIRROR=${BLUESKY_ZARR_MATRIX_MIRROR:-http://deb.debian.org/debian}
CONSTRAINTS=${BLUESKY_ZARR_MATRIX_CONSTRAINTS:-}
read -r -a PYTEST_ARGS <<<"${BLUESKY_ZARR_MATRIX_PYTEST_ARGS:-}"
PACKAGES=(zarr numcodecs numpy xarray icechunk tiled h5py tensorstore ophyd-async
    bluesky event-model ophyd dls-dodal scanspec)
# The CA bundle of this machine (it may hold a CA that PyPI is reached through).
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
BASE_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

prepare_only=false
rebuild=false
entries=()
for arg in "$@"; do
    case $arg in
        --prepare) prepare_only=true ;;
        --rebuild) rebuild=true ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        3.11 | 3.12 | 3.13 | 3.14 | lowest) entries+=("$arg") ;;
        *) echo "matrix: unknown entry '$arg' (3.11, 3.12, 3.13, 3.14, lowest)" >&2; exit 2 ;;
    esac
done
if ((${#entries[@]} == 0)); then
    echo "usage: ci/matrix.sh [--prepare] [--rebuild] {3.11|3.12|3.13|3.14|lowest}..." >&2
    exit 2
fi
if ((EUID != 0)); then
    echo "matrix: needs root (debootstrap, chroot, mount)" >&2
    exit 2
fi

log() { printf '[matrix %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

suite_of() {
    case $1 in
        3.13) echo trixie ;;
        3.14) echo forky ;;
        *) echo "" ;;
    esac
}

# --- mounts: every mount under a chroot of ours is undone on exit -------------

mounted_roots=()

unmount_below() {
    # Every mount point at or below $1, deepest first (also those a test left).
    local root=$1 target
    while read -r target; do
        umount "$target" 2>/dev/null || umount -l "$target" 2>/dev/null || true
    done < <(awk -v root="$root" '$5 == root || index($5, root "/") == 1 { print $5 }' \
        /proc/self/mountinfo | sort -r)
}

stop_processes_in() {
    # Processes whose root is the chroot (a server a test left running), by pid.
    local root=$1 proc pid
    for proc in /proc/[0-9]*; do
        pid=${proc#/proc/}
        [[ $(readlink "$proc/root" 2>/dev/null) == "$root" ]] && kill -9 "$pid" 2>/dev/null || true
    done
}

cleanup() {
    local root
    for root in "${mounted_roots[@]}"; do
        stop_processes_in "$root"
        unmount_below "$root"
    done
    mounted_roots=()
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mount_into() {
    local root=$1
    mounted_roots+=("$root")
    mount -t proc proc "$root/proc"
    mount --bind /sys "$root/sys"
    mount --bind /dev "$root/dev"
    mount --bind /dev/pts "$root/dev/pts"
    mount --bind /dev/shm "$root/dev/shm"
}

# --- chroots -----------------------------------------------------------------

ensure_debootstrap() {
    command -v debootstrap >/dev/null && return
    log "installing debootstrap"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
}

make_chroot() {
    # Debian ${suite} with its python3 in $CACHE/$suite (reused when ready).
    local suite=$1 root=$CACHE/$1 script=() start
    if [[ -e $root/.ready ]] && ! $rebuild; then
        log "$suite: chroot $root ready ($(cat "$root/.ready"))"
        chroot_packages "$suite"
        return
    fi
    ensure_debootstrap || return 1
    unmount_below "$root"
    unmount_below "$root.new"
    rm -rf --one-file-system "$root" "$root.new"
    # A suite newer than this debootstrap knows is made with the script of sid.
    [[ -e /usr/share/debootstrap/scripts/$suite ]] || script=(/usr/share/debootstrap/scripts/sid)
    log "$suite: debootstrap into $root"
    start=$SECONDS
    debootstrap --variant=minbase \
        --include=python3,python3-venv,python3-dev,gcc,ca-certificates,git \
        "$suite" "$root.new" "$MIRROR" "${script[@]}" >"$CACHE/$suite.debootstrap.log" 2>&1 || {
        tail -n 30 "$CACHE/$suite.debootstrap.log"
        echo "matrix: debootstrap $suite failed (log: $CACHE/$suite.debootstrap.log)" >&2
        return 1
    }
    date -u +%Y-%m-%dT%H:%MZ >"$root.new/.ready" && mv "$root.new" "$root" || return 1
    log "$suite: chroot made in $((SECONDS - start)) s"
    chroot_packages "$suite"
}

chroot_packages() {
    # What the tests need in chroot $CACHE/$1 besides Python: redis-server,
    # the streaming cache of the Tiled server tests/system/test_tiled_live.py
    # starts (from the suite's own archive; no service is started). A testing
    # suite's Release file may have passed its Valid-Until on a mirror that
    # lags: apt is told not to mind.
    local suite=$1 root=$CACHE/$1
    [[ -x $root/usr/bin/redis-server ]] && return
    log "$suite: installing redis-server in the chroot"
    cp /etc/resolv.conf "$root/etc/resolv.conf" || return 1
    printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d" && chmod +x "$root/usr/sbin/policy-rc.d"
    chroot "$root" env -i "PATH=$BASE_PATH" DEBIAN_FRONTEND=noninteractive sh -c \
        'apt-get -o Acquire::Check-Valid-Until=false update -qq &&
         apt-get install -y -qq --no-install-recommends redis-server' \
        >"$CACHE/$suite.packages.log" 2>&1 || {
        tail -n 30 "$CACHE/$suite.packages.log"
        echo "matrix: installing redis-server in $root failed (log: $CACHE/$suite.packages.log)" >&2
        return 1
    }
}

# --- running one entry -------------------------------------------------------

# Results, by entry.
declare -A result install_s suite_s versions

copy_tree() {
    # The working tree's tracked files and new files git does not ignore.
    local dest=$1
    rm -rf --one-file-system "$dest"
    mkdir -p "$dest"
    git -C "$REPO" ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' file; do
            [[ -e $REPO/$file || -L $REPO/$file ]] && printf '%s\0' "$file"
        done |
        tar -C "$REPO" --null -T - -cf - | tar -C "$dest" -xf -
}

host_python() {
    # The path of this machine's python$1: on PATH, else one pyenv has.
    local found
    found=$("python$1" -c 'import sys; print(sys.executable)' 2>/dev/null) ||
        found=$(ls -d "$(pyenv root 2>/dev/null)/versions/$1".*/bin/"python$1" 2>/dev/null |
            sort -V | tail -n 1)
    if [[ -z $found ]]; then
        echo "matrix: no python$1 on this machine" >&2
        return 1
    fi
    echo "$found"
}

run_entry() {
    # Called in a list (`run_entry || ...`), where `set -e` does not apply:
    # each step that must not fail says so.
    local entry=$1 suite root prefix work python env_base env_install start rc pip_args
    suite=$(suite_of "$entry")
    if [[ -n $suite ]]; then
        root=$CACHE/$suite
        make_chroot "$suite" || return 1
        prefix=(chroot "$root")
        work=/matrix
        mount_into "$root" || return 1
        cp /etc/resolv.conf "$root/etc/resolv.conf" || return 1
        cp "$CA_BUNDLE" "$root$CA_BUNDLE" || return 1
        python=python3
    else
        root=""
        prefix=()
        work=$CACHE/host-$entry
        # No Debian release ships 3.12 (bookworm has 3.11, trixie 3.13): 3.11,
        # 3.12 and lowest (3.11) take the host's interpreter, itself, not a
        # wrapper (pyenv's shims need its environment).
        python=$(host_python "${entry/lowest/3.11}") || return 1
    fi
    local venv=$work/venv src=$work/src
    # A clean environment: none of the host's PIP_*/UV_* variables or pip
    # configuration files; the CA bundle only for installing.
    # Temporary files (pytest's tmp_path among them) in a directory of the
    # entry's own, never in a /tmp that other runs on this machine share.
    env_base=(env -i "PATH=$venv/bin:$BASE_PATH" "HOME=$work/home" "TMPDIR=$work/tmp"
        LANG=C.UTF-8 PYTHONUNBUFFERED=1)
    [[ -n ${CI:-} ]] && env_base+=("CI=$CI")
    env_install=("${env_base[@]}" PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1
        "PIP_CERT=$CA_BUNDLE" "SSL_CERT_FILE=$CA_BUNDLE" UV_NO_CONFIG=1)

    log "$entry: copying the working tree to ${root}$src"
    copy_tree "${root}$src" || return 1
    unmount_below "${root}$work/tmp"  # a tmpfs a killed test run left mounted
    rm -rf --one-file-system "${root}$venv" "${root}$work/tmp"
    mkdir -p "${root}$work/home" "${root}$work/tmp"
    pip_args=()
    if [[ -n $CONSTRAINTS ]]; then
        tr ' ' '\n' <<<"$CONSTRAINTS" >"${root}$work/constraints.txt"
        pip_args=(-c "$work/constraints.txt")
        log "$entry: constraints: $CONSTRAINTS"
    fi

    start=$SECONDS
    log "$entry: installing (fresh venv)"
    rc=0
    if [[ $entry == lowest ]]; then
        # pyproject.toml's dependencies resolved as the direct ones (uv pip
        # install -e . would count only the package itself as direct, and take
        # the newest of what it needs), then the package without them.
        locked tools install_uv "$python" || return 1
        "${env_install[@]}" "$UV" venv --quiet --python "$python" "$venv" &&
            "${env_install[@]}" "$UV" pip compile --quiet --python "$venv/bin/python" \
                --resolution lowest-direct --extra test "${pip_args[@]}" \
                -o "$work/lowest.txt" "$src/pyproject.toml" &&
            "${env_install[@]}" "$UV" pip install --quiet --python "$venv/bin/python" \
                -r "$work/lowest.txt" &&
            "${env_install[@]}" "$UV" pip install --quiet --python "$venv/bin/python" \
                --no-deps -e "$src" || rc=$?
    else
        # The newest pip too: the pip a venv starts with (Debian's) can take
        # tens of minutes backtracking through the test extra's botocore pins.
        "${prefix[@]}" "${env_install[@]}" "$python" -m venv "$venv" &&
            "${prefix[@]}" "${env_install[@]}" "$venv/bin/pip" install --progress-bar off -q -U pip &&
            "${prefix[@]}" "${env_install[@]}" sh -c 'cd "$1" && shift && exec "$@"' sh "$src" \
                "$venv/bin/pip" install --progress-bar off -q -e ".[test]" "${pip_args[@]}" || rc=$?
    fi
    install_s[$entry]=$((SECONDS - start))
    log "$entry: install took ${install_s[$entry]} s"
    if ((rc != 0)); then
        result[$entry]="FAILED (install, exit $rc)"
        return 0
    fi

    versions[$entry]=$("${prefix[@]}" "${env_base[@]}" "$venv/bin/python" - "${PACKAGES[@]}" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

found = [f"python={sys.version.split()[0]}"]
for name in sys.argv[1:]:
    try:
        found.append(f"{name}={version(name)}")
    except PackageNotFoundError:
        found.append(f"{name}=-")
print(" ".join(found))
EOF
    ) || versions[$entry]="(could not read versions)"
    log "$entry: ${versions[$entry]}"

    start=$SECONDS
    log "$entry: running the test suite"
    rc=0
    "${prefix[@]}" "${env_base[@]}" sh -c 'cd "$1" && shift && exec "$@"' sh "$src" \
        "$venv/bin/python" -m pytest -p no:cacheprovider "${PYTEST_ARGS[@]}" || rc=$?
    suite_s[$entry]=$((SECONDS - start))
    log "$entry: suite took ${suite_s[$entry]} s (exit $rc)"
    # Exit 5 (no test collected) is a failure like any other non-zero exit.
    if ((rc == 0)); then result[$entry]=passed; else result[$entry]="FAILED (pytest exit $rc)"; fi
    if [[ -n $root ]]; then
        stop_processes_in "$root"
        cleanup
    fi
}

install_uv() {
    # uv from PyPI, in a venv of its own.
    local tools=$CACHE/tools
    UV=$tools/bin/uv
    [[ -x $UV ]] && return
    log "installing uv from PyPI"
    rm -rf --one-file-system "$tools"
    "$1" -m venv "$tools" &&
        "${env_install[@]}" "$tools/bin/pip" install --progress-bar off -q uv
}

locked() {
    # Runs "$@" holding $CACHE/$1.lock: one run at a time uses an entry's
    # chroot and venv (or makes the tools); other entries may run beside it.
    local name=$1 fd rc=0
    shift
    exec {fd}>"$CACHE/$name.lock"
    if ! flock -n "$fd"; then
        log "waiting for another matrix run using $name"
        flock "$fd"
    fi
    "$@" || rc=$?
    exec {fd}>&-
    return $rc
}

mkdir -p "$CACHE"

total=$SECONDS
for entry in "${entries[@]}"; do
    suite=$(suite_of "$entry")
    if $prepare_only; then
        [[ -z $suite ]] || locked "$entry" make_chroot "$suite" || exit 1
        continue
    fi
    locked "$entry" run_entry "$entry" || result[$entry]="FAILED (setup)"
done
$prepare_only && exit 0

echo
echo "== matrix: $((SECONDS - total)) s in all"
status=0
for entry in "${entries[@]}"; do
    printf '%-7s %-26s install %5s s  suite %5s s\n' "$entry" "${result[$entry]:-FAILED}" \
        "${install_s[$entry]:--}" "${suite_s[$entry]:--}"
    printf '        %s\n' "${versions[$entry]:-}"
    [[ ${result[$entry]:-} == passed ]] || status=1
done
exit $status
