#!/usr/bin/env bash
# The README's demo command on a fresh machine (`just fresh-demo-test`, part of `just test`):
# a bare Debian container built offline from Debian's packages (the packaging test's base
# image) holding only what a new machine of this kind ships besides: this host's Rust
# toolchain, Python and Node.js, mounted (read-only, or as an overlay whose writes are
# discarded). In it, `./dev demo` runs from a clean clone of HEAD: it installs `just` and the
# PostgreSQL server itself, builds, and prints url, user and password. The test then logs in
# at that url with those credentials and finds the demo agent online. Prints how long the
# demo took to its url. The host's target/ and cargo registry are overlaid (not copied), so
# only the workspace's own crates are built again.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
run=freshdemo-$$
base=localhost/debian:bookworm
image=localhost/outpost-fresh-machine
say() { printf '\n== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

work=$(mktemp -d)
cleanup() {
    podman rm -f -t 0 "$run" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

for tool in podman debootstrap git; do
    command -v "$tool" >/dev/null || fail "$tool is missing (just setup test installs it)"
done
python=$(python3 -c 'import sys; print(sys.base_prefix)')
# A Python of the machine's own (pyenv, /opt, /usr/local) is mounted; Debian's own (/usr)
# cannot be without taking the container's /usr, so the image installs Debian's instead.
python_mount=(-v "$python:$python:O")
python_debs=""
if [ "$python" = /usr ]; then
    python_mount=()
    python_debs="python3-pip"
fi
rust_home=${RUSTUP_HOME:-$HOME/.rustup}
cargo_home=${CARGO_HOME:-$HOME/.cargo}
node_modules=$(cd "$(dirname "$(readlink -f "$(command -v npm)")")/../.." && pwd)
[ -x /usr/bin/node ] || fail "this host's Node.js is expected at /usr/bin/node"

# The image this test runs in, built offline; `scripts/fresh-demo-test.sh --image` builds only
# it (`just test` does that early, beside the compile, while the network and the disk are idle).
build_image() {
    "$root/scripts/debian-base-image.sh"
    podman build --pull=never -q -t "$image" -f - "$root/scripts" >/dev/null <<EOF
FROM $base
RUN apt-get update -q && apt-get install -y -q --no-install-recommends \
    ca-certificates curl git gcc libc6-dev libssl3 libffi8 libsqlite3-0 libbz2-1.0 zlib1g \
    libreadline8 libncursesw6 liblzma5 $python_debs >/dev/null \
 && ln -s $node_modules/npm/bin/npm-cli.js /usr/bin/npm
EOF
}
if [ "${1:-}" = --image ]; then
    build_image
    exit 0
fi

say "image: bare Debian (debootstrap) with the C toolchain and the libraries this host's Python links"
build_image
echo "ok"

say "a clean clone of HEAD"
git clone --quiet "$root" "$work/outpost"
echo "ok: $(git -C "$work/outpost" log --oneline -1)"

say "./dev demo in the container"
# The machine's trust store and the variables that point tools at it come along: where
# egress goes through a TLS proxy, npm, pip and cargo reach their registries only with it.
trust=()
[ -f /etc/ssl/certs/ca-certificates.crt ] \
    && trust+=(-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
for var in NODE_EXTRA_CA_CERTS SSL_CERT_FILE SSL_CERT_DIR PIP_CERT REQUESTS_CA_BUNDLE \
    CURL_CA_BUNDLE GIT_SSL_CAINFO CARGO_HTTP_CAINFO; do
    [ -n "${!var:-}" ] && trust+=(-e "$var=${!var}")
done
# The clone sits where this checkout is, so the overlaid target/ matches its paths.
podman run -d --name "$run" "${trust[@]}" \
    -v "$work/outpost:$root" \
    -v "$root/target:$root/target:O" \
    -v "$rust_home:$rust_home:ro" \
    -v "$cargo_home:$cargo_home:O" \
    "${python_mount[@]}" \
    -v /usr/bin/node:/usr/bin/node:ro \
    -v "$node_modules:$node_modules:ro" \
    -e RUSTUP_HOME="$rust_home" -e CARGO_HOME="$cargo_home" \
    -e PATH="$cargo_home/bin:$python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    -w "$root" "$image" sleep infinity >/dev/null
# Without root or sudo, the set-up stops before installing anything and names the packages.
refused=$(podman exec "$run" setpriv --reuid=65534 --regid=65534 --clear-groups \
    bash scripts/setup.sh demo 2>&1) && fail "setup as nobody did not stop: $refused"
case "$refused" in
    *"Debian packages (apt-get): postgresql postgresql-client"*"needs root"*) ;;
    *) fail "setup as nobody did not name the packages and the reason: $refused" ;;
esac
podman exec "$run" sh -c '! dpkg-query -W postgresql >/dev/null 2>&1' || fail "setup as nobody installed something"
echo "ok: without root or sudo it stops first and names the packages"
# This host's Python has `just` installed: take it away (in the overlay) so `./dev` must
# install it, as on a new machine.
podman exec "$run" python3 -m pip uninstall --quiet --yes rust-just >/dev/null 2>&1 || true
podman exec "$run" sh -c '! command -v just' || fail "just is still there"
started=$(date +%s)
podman exec -d "$run" sh -c './dev demo > /tmp/demo.out 2> /tmp/demo.err; echo $? > /tmp/demo.rc'
url="" user="" password=""
for _ in $(seq 1 1800); do
    out=$(podman exec "$run" cat /tmp/demo.out 2>/dev/null || true)
    url=$(printf '%s\n' "$out" | sed -n 's/^url: //p')
    user=$(printf '%s\n' "$out" | sed -n 's/^user: //p')
    password=$(printf '%s\n' "$out" | sed -n 's/^password: //p')
    [ -n "$password" ] && break
    if podman exec "$run" test -e /tmp/demo.rc; then
        fail "./dev demo exited $(podman exec "$run" cat /tmp/demo.rc) before printing its url: $(podman exec "$run" tail -20 /tmp/demo.err)"
    fi
    sleep 1
done
[ -n "$password" ] || fail "no url after 30 min: $(podman exec "$run" tail -20 /tmp/demo.err)"
took=$(( $(date +%s) - started ))
echo "ok: $url printed after $took s"
echo "what it did:"
podman exec "$run" sh -c 'cat /tmp/demo.out /tmp/demo.err' | grep -E '^(installing just|setup \(demo\)|  Debian|   Compiling|    Finished|added [0-9]+ packages|starting a throwaway)' \
    | sed 's/^ */  /' | sort | uniq -c | sed 's/^ */  /' || true

say "log in at the printed url with the printed credentials"
token=$(podman exec "$run" curl -fsS -H 'Content-Type: application/json' \
    -d "{\"username\":\"$user\",\"password\":\"$password\"}" "${url%/}/api/v1/sessions" \
    | sed -n 's/.*"token":"\([^"]*\)".*/\1/p') || fail "login at $url as $user"
[ -n "$token" ] || fail "no token from the login"
for i in $(seq 1 60); do
    podman exec "$run" curl -fsS -H "Authorization: Bearer $token" "${url%/}/api/v1/agents" \
        | grep -q '"status":"online"' && break
    [ "$i" = 60 ] && fail "the demo agent is not online"
    sleep 1
done
echo "ok: logged in as $user, the demo agent is online"
say "fresh-machine demo test passed: ./dev demo printed its url after $took s"
