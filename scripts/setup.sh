#!/usr/bin/env bash
# Installs what `./dev demo` or `./dev test` needs on a Debian machine, skipping what is
# present; `just demo` and `just test` run it first. It works out everything that is missing,
# says what it will install, and only then installs it. Debian packages and the containers
# config need root: it uses sudo when not root. On a machine that is not Debian, or without
# root or sudo, it stops before installing anything and names what to install.
#
#   scripts/setup.sh demo     PostgreSQL server and client; Node.js and npm if missing
#   scripts/setup.sh test     the demo's, plus Redis, sshd, Chromium, Podman (with runc and
#                             debootstrap), promtool, iproute2/iptables, a C++ compiler;
#                             /etc/containers/containers.conf; podman-compose and
#                             schemathesis from PyPI; cargo-deb, cargo-fuzz, cargo-nextest
#   scripts/setup.sh test --check   only say what is missing (exit 1 when something is)
set -euo pipefail

what=${1:-}
check_only=false
[ "${2:-}" = "--check" ] && check_only=true

# Pinned versions of the tools that do not come from Debian.
PODMAN_COMPOSE=1.6.0
SCHEMATHESIS=4.32.5
CARGO_DEB=3.8.0
CARGO_FUZZ=0.13.2
CARGO_NEXTEST=0.9.143

demo_debs=(postgresql postgresql-client)
test_debs=(
    # Real services for the fixtures (tests start their own instances; none is skipped).
    postgresql postgresql-client redis-server openssh-server openssh-client ca-certificates curl
    python3-pip chromium util-linux procps openssl systemd g++
    # The chaos suite: network namespaces, veth links, iptables cuts inside them.
    iproute2 iptables
    # The packaging and appliance tests: Podman with runc, debootstrap for the offline base image.
    podman runc debootstrap netavark aardvark-dns
    # pgBackRest, for the backup kinds' tests (a real repository in a temp directory).
    pgbackrest
    # promtool (the appliance's alert rules); its server is stopped after the install.
    prometheus
    # An SMTP server for the email channel's test (STARTTLS, AUTH); Debian's python3 runs it.
    python3-aiosmtpd
    # A real Alertmanager for the alertmanager channel's test (the test starts its own).
    prometheus-alertmanager
)
containers_conf='[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]
[engine]
runtime = "runc"'

case "$what" in
    demo) debs=("${demo_debs[@]}") ;;
    test) debs=("${test_debs[@]}") ;;
    *) echo "usage: scripts/setup.sh demo|test [--check]" >&2; exit 2 ;;
esac
# Node.js and npm build the web UI; a machine that has them (from anywhere) keeps its own.
command -v npm >/dev/null 2>&1 || debs+=(nodejs npm)

missing_debs=()
for deb in "${debs[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$deb" 2>/dev/null || true)
    [ "$status" = "install ok installed" ] || missing_debs+=("$deb")
done
needs_conf=false
missing_pip=()
missing_cargo=()
if [ "$what" = test ]; then
    [ "$(cat /etc/containers/containers.conf 2>/dev/null)" = "$containers_conf" ] || needs_conf=true
    pip_has() { [ "$(python3 -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p')" = "$2" ]; }
    pip_has podman-compose "$PODMAN_COMPOSE" || missing_pip+=("podman-compose==$PODMAN_COMPOSE")
    pip_has schemathesis "$SCHEMATHESIS" || missing_pip+=("schemathesis==$SCHEMATHESIS")
    cargo deb --version 2>/dev/null | grep -qF "$CARGO_DEB" || missing_cargo+=("cargo-deb@$CARGO_DEB")
    cargo fuzz --version 2>/dev/null | grep -qF "$CARGO_FUZZ" || missing_cargo+=("cargo-fuzz@$CARGO_FUZZ")
    # Any nextest will do: the machine's own is kept.
    cargo nextest --version >/dev/null 2>&1 || missing_cargo+=("cargo-nextest@$CARGO_NEXTEST")
fi

if [ ${#missing_debs[@]} = 0 ] && ! $needs_conf && [ ${#missing_pip[@]} = 0 ] && [ ${#missing_cargo[@]} = 0 ]; then
    echo "setup ($what): everything is installed"
    exit 0
fi
echo "setup ($what) will install:"
[ ${#missing_debs[@]} = 0 ] || echo "  Debian packages (apt-get): ${missing_debs[*]}"
$needs_conf && echo "  /etc/containers/containers.conf (Podman: runc, lowered rlimits)"
[ ${#missing_pip[@]} = 0 ] || echo "  from PyPI (pip): ${missing_pip[*]}"
[ ${#missing_cargo[@]} = 0 ] || echo "  from crates.io (cargo install --debug --locked): ${missing_cargo[*]}"
$check_only && exit 1

# Root for apt-get and /etc: ourselves, or sudo without a password prompt halfway through.
sudo=""
if [ ${#missing_debs[@]} -gt 0 ] || $needs_conf; then
    if ! command -v apt-get >/dev/null 2>&1 || [ ! -f /etc/debian_version ]; then
        echo "error: this is not a Debian machine: install the packages above (or their equivalents) yourself, then run again" >&2
        exit 1
    fi
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            sudo="sudo"
            echo "(as root through sudo)"
        else
            echo "error: installing them needs root: run as root or with sudo that needs no password, or install them yourself" >&2
            exit 1
        fi
    fi
fi

# The cargo tools compile while apt-get and pip download and unpack (they mostly wait on the
# network and the disk). Debug builds: they only drive cargo and pack files, and compile in
# half the time (cargo-deb 23 s against 49 s here, packing at the same speed).
cargo_log=""
cargo_pid=""
if [ ${#missing_cargo[@]} -gt 0 ]; then
    cargo_log=$(cd "$(dirname "$0")/.." && pwd)/target/setup-cargo-install.log
    mkdir -p "$(dirname "$cargo_log")"
    (
        for spec in "${missing_cargo[@]}"; do
            cargo install --debug --locked "${spec%@*}" --version "${spec#*@}" || exit 1
        done
    ) > "$cargo_log" 2>&1 &
    cargo_pid=$!
    echo "  (cargo tools building in the background; log: $cargo_log)"
fi

if [ ${#missing_debs[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends "${missing_debs[@]}" >/dev/null
    if printf '%s\n' "${missing_debs[@]}" | grep -qx prometheus; then
        # Only promtool is wanted, not a server listening on :9090.
        $sudo systemctl disable --now prometheus >/dev/null 2>&1 || $sudo pkill -x prometheus || true
    fi
    if printf '%s\n' "${missing_debs[@]}" | grep -qx prometheus-alertmanager; then
        # Tests start their own; none listening on :9093.
        $sudo systemctl disable --now prometheus-alertmanager >/dev/null 2>&1 || $sudo pkill -f '^/usr/bin/prometheus-alertmanager' || true
    fi
fi
if $needs_conf; then
    $sudo mkdir -p /etc/containers
    printf '%s\n' "$containers_conf" | $sudo tee /etc/containers/containers.conf >/dev/null
fi
for spec in "${missing_pip[@]}"; do
    python3 -m pip install --quiet "$spec" \
        || python3 -m pip install --quiet --break-system-packages "$spec"
done
# pip puts commands in the interpreter's scripts dir (the justfile puts it on PATH).
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
if [ -n "$cargo_pid" ] && ! wait "$cargo_pid"; then
    tail -30 "$cargo_log" >&2
    echo "error: cargo install failed (${missing_cargo[*]}); full log: $cargo_log" >&2
    exit 1
fi
echo "setup ($what): done"
