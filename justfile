# Outpost: the front door. `just` (or `./dev`, which installs `just` first) lists the recipes.
# `demo` and `test` install what they need first (`setup`).

set shell := ["bash", "-euo", "pipefail", "-c"]

# Commands pip installs (podman-compose, schemathesis) live in the interpreter's scripts dir.
export PATH := `python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null || true` + ":" + env_var("PATH")

# Fixed seed set run by `just test` (every scenario for each seed, each seed twice).
sim_seeds := "25"
# The rollouts scenario simulates 200 agents (about 12 s a seed): fewer of its seeds in CI.
sim_rollout_seeds := "6"

# With no registry, the compose file's third-party images are the ones built from Debian's
# packages (deploy/test-images/).
appliance_images := "OUTPOST_POSTGRES_IMAGE=localhost/outpost-test-postgres OUTPOST_REDIS_IMAGE=localhost/outpost-test-redis OUTPOST_PROXY_IMAGE=localhost/outpost-test-nginx OUTPOST_PROMETHEUS_IMAGE=localhost/outpost-test-prometheus"

default:
    @just --list

# Root or sudo for the Debian packages and containers config; `--check` only lists what is missing.
# Install what `demo` or `test` needs when missing: Debian packages, containers config, PyPI and cargo tools (pinned).
setup what="test" *check:
    bash scripts/setup.sh {{what}} {{check}}

# Ctrl+C stops everything and cleans up.
# Throwaway Postgres + control plane + one enrolled agent; prints url, user, password. Installs PostgreSQL (and npm) when missing.
demo listen="127.0.0.1:8080": (setup "demo") web
    cargo build --bins
    ./target/debug/outpost demo --listen {{listen}}

# cargo-deb is installed if missing; systemd units, default configs and maintainer scripts come
# from packaging/. VERSION sets the Debian version (default: the crate's, revision 1).
# Debian packages of outpost-agent and outpost into target/debian/, e.g. `just packages 0.1.0-2`.
packages version="": web
    command -v cargo-deb >/dev/null || cargo install --debug cargo-deb --locked --version 3.8.0
    cargo build --release -p agent -p control-plane --bins
    cargo deb --no-build -p agent {{ if version == "" { "" } else { "--deb-version " + version } }}
    cargo deb --no-build -p control-plane {{ if version == "" { "" } else { "--deb-version " + version } }}
    ls -l target/debian/*.deb

# Both packages installed into bare Debian containers (Podman; images built offline), run as their units run them, upgraded, removed, purged.
packaging-test: packages
    #!/usr/bin/env bash
    set -euo pipefail
    v=$(dpkg-deb -f target/debian/outpost-agent_*_amd64.deb Version)
    rm -rf target/debian-next
    # cargo-deb deletes the package's other .deb in target/debian: build the newer one, then again the current one.
    cargo deb --no-build -p agent --deb-version "${v%-*}-$(( ${v##*-} + 1 ))" -o target/debian-next/ >/dev/null
    cargo deb --no-build -p agent >/dev/null
    bash packaging/test.sh

# Images built offline (deploy/build-images.sh), secrets in deploy/.env (deploy/make-env.sh),
# then `podman-compose up -d` of deploy/docker-compose.yml. PROFILE `none`: no demo agent.
# The appliance here with Podman (no registry needed), with a demo agent, on https://localhost:PORT.
appliance profile="demo" port="8443": web
    command -v podman-compose >/dev/null || python3 -m pip install --quiet podman-compose==1.6.0
    cargo build --release -p agent -p control-plane --bins
    deploy/build-images.sh latest
    deploy/make-env.sh
    cd deploy && OUTPOST_HTTPS_PORT={{port}} OUTPOST_BIND=127.0.0.1 {{appliance_images}} podman-compose {{ if profile == "none" { "" } else { "--profile " + profile } }} up -d
    @echo "up: https://localhost:{{port}} (CA: podman cp outpost_proxy_1:/certs/ca.crt .); first admin: cd deploy && podman-compose exec control-plane-1 outpost admin create-user admin --role admin"

# Stop the appliance `just appliance` started; VOLUMES=-v also deletes its data.
appliance-down volumes="":
    cd deploy && {{appliance_images}} podman-compose --profile demo down {{volumes}}

# The appliance test (deploy/test.sh): the compose stack built and run offline with Podman.
appliance-test: web
    command -v podman-compose >/dev/null || python3 -m pip install --quiet podman-compose==1.6.0
    cargo build --release -p agent -p control-plane --bins
    bash deploy/test.sh

# The Postgres storage suite and a two-replica terminal test through Redis, in containers
# started through Podman's Docker-compatible API (its socket is started if missing), on images
# built offline from Debian's packages.
# The fixtures' testcontainers backend (OUTPOST_FIXTURES=docker) for real, through Podman.
fixtures-docker-test:
    #!/usr/bin/env bash
    set -euo pipefail
    deploy/build-images.sh --services
    sock=/run/podman/podman.sock
    if ! curl -fsS --unix-socket "$sock" http://podman/_ping >/dev/null 2>&1; then
        mkdir -p "$(dirname "$sock")"
        podman system service --time=0 "unix://$sock" > target/podman-service.log 2>&1 &
        service=$!
        trap 'kill $service' EXIT
        for i in $(seq 1 50); do curl -fsS --unix-socket "$sock" http://podman/_ping >/dev/null 2>&1 && break; sleep 0.1; done
    fi
    DOCKER_HOST="unix://$sock" OUTPOST_FIXTURES=docker \
    OUTPOST_FIXTURES_POSTGRES_IMAGE=localhost/outpost-test-postgres:latest \
    OUTPOST_FIXTURES_REDIS_IMAGE=localhost/outpost-test-redis:latest \
        cargo nextest run --workspace --profile ci \
        -E 'test(/^storage::postgres/) | test(browser_and_agent_on_different_replicas_meet_through_redis)'

# Build the browser UI (npm) into control-plane/web/dist; `outpost` embeds it when it is built.
# `npm ci` runs only when package-lock.json changed since the last install; the build writes
# only files whose bytes changed, so cargo does not rebuild `outpost` for nothing.
web:
    #!/usr/bin/env bash
    set -euo pipefail
    cd control-plane/web
    lock=$(sha256sum package-lock.json | cut -d' ' -f1)
    if [ "$(cat node_modules/.outpost-lock 2>/dev/null)" != "$lock" ]; then
        npm ci --no-audit --no-fund --loglevel=error
        echo "$lock" > node_modules/.outpost-lock
    fi
    npm run build --silent

# Everything CI checks: formatting, lints, all tests (real Postgres/Redis/sshd/psql, headless Chromium), fixed sim seeds and regressions, the packaging and appliance tests (Podman). Installs what they need first (`setup test`); prints each step's time at the end.
test: (setup "test")
    #!/usr/bin/env bash
    set -euo pipefail
    . scripts/steps.sh
    step "formatting" cargo fmt --all -- --check
    # What runs beside what: a job in the background only ever shares the machine with steps
    # that do not care how long they take (a compile) or with steps that mostly wait and have
    # no deadline a slower machine breaks; never with the container tests (a browser check
    # timed out beside the fuzz build). The container images mostly wait on Debian's mirror
    # and the disk, so they are built beside the compile.
    background "container images" just test-images
    step "web UI" just web
    step "web unit tests" bash -c 'cd control-plane/web && npm test --silent'
    # Lints ride on the one build: clippy-driver compiles the workspace's own crates (code and
    # all) and lints them as it goes, so nothing is compiled a second time just to be linted.
    # Every cargo call below inherits this, so they all find that build fresh.
    . scripts/test-build-env.sh
    step "build and lints" cargo build --workspace --all-targets
    step "waiting for the container images" await "container images"
    # The tests and the chaos seed mostly wait (on Postgres, timers, faults), so they run
    # together, and the release build the packaging and appliance tests need and the simulator
    # (simulated time) take what they leave idle, the release build first. Measured side by
    # side: the tests 93 s (95 s alone), the chaos seed 144 s and valid (141 s alone), the 25
    # seeds twice 115 s (114 s alone); the release build got a third of its work done there.
    background_first "release build" cargo build --release -p agent -p control-plane --bins
    background "sim seeds and regressions" bash -c './target/debug/sim run --seed 0 --seeds {{sim_seeds}} --except rollouts --check-determinism && ./target/debug/sim run --seed 0 --seeds {{sim_rollout_seeds}} --scenario rollouts --check-determinism && ./target/debug/sim regressions --check-determinism'
    alongside "chaos seeds" bash scripts/chaos-seeds.sh
    # A changed or new snapshot fails here; accept it with INSTA_UPDATE=always and review the .snap diff.
    step "tests" env INSTA_UPDATE=no cargo nextest run --workspace --profile ci
    step "waiting for the chaos seeds" await "chaos seeds"
    grep -hE '^(== chaos seed|faults injected|  \[|verdict)' "target/steps/chaos seeds.log" || true
    step "fixtures (docker)" just fixtures-docker-test
    step "schemathesis" just schemathesis
    step "fresh demo test" just fresh-demo-test
    step "waiting for the release build" await "release build"
    step "waiting for the sim seeds" await "sim seeds and regressions"
    step "packaging test" just packaging-test
    step "appliance test" just appliance-test
    # A dev-profile build: nothing to optimise, the same coverage instrumentation. The fuzz
    # workspace is its own build, so it goes without the lints' compiler wrapper.
    step "fuzz" env -u RUSTC_WORKSPACE_WRAPPER -u CLIPPY_ARGS just fuzz 15 dev

# Each test builds what is missing itself, so this only moves the work earlier (`just test`).
# The container images of the packaging, appliance, fixtures and fresh-demo tests that do not hold Outpost's binaries, built offline.
test-images:
    deploy/build-images.sh --services
    bash packaging/test.sh --images
    bash scripts/fresh-demo-test.sh --image

# The README's demo command from a clean clone in a bare Debian container with only this machine kind's tools; logs in at the printed url.
fresh-demo-test:
    bash scripts/fresh-demo-test.sh

# Schemathesis (PyPI) against GET /api/openapi.json of a fresh control plane with an admin
# token: no 5xx, every response matches its documented schema and content type.
schemathesis examples="50":
    command -v schemathesis >/dev/null || python3 -m pip install --quiet schemathesis==4.32.5
    cargo build --bins
    bash control-plane/tests/schemathesis.sh {{examples}}

# Build the fuzz targets (PROFILE `release` or `dev`) without running them.
fuzz-build profile="release":
    #!/usr/bin/env bash
    set -euo pipefail
    case "{{profile}}" in
      release|dev) ;;
      *) echo "unknown fuzz profile '{{profile}}': release or dev" >&2; exit 2 ;;
    esac
    command -v cargo-fuzz >/dev/null || cargo install --debug cargo-fuzz --locked --version 0.13.2
    cd fuzz
    cargo fuzz build -s none --{{profile}} --target-dir ../target/fuzz-{{profile}}

# Fuzz every decoder that reads bytes from outside (fuzz/fuzz_targets), SECONDS each, one target
# per core at a time (default 60; PROFILE `dev` builds faster and runs slower), on stable Rust with libFuzzer (`cargo fuzz -s none`). Seeds: fuzz/seeds/TARGET; what a run
# finds grows target/fuzz-corpus/TARGET; a crash stops the run and is saved under
# fuzz/artifacts/TARGET (reproduce: `cd fuzz && cargo fuzz run -s none TARGET FILE`).
fuzz seconds="60" profile="release": web (fuzz-build profile)
    #!/usr/bin/env bash
    set -euo pipefail
    cd fuzz
    opts=(-s none --{{profile}} --target-dir ../target/fuzz-{{profile}})
    # One target per core at a time; each prints its summary line when it ends.
    one() {
        local target=$1 log="../target/fuzz-logs/$1.log"
        mkdir -p "../target/fuzz-corpus/$target" ../target/fuzz-logs
        cargo fuzz run "${opts[@]}" "$target" "../target/fuzz-corpus/$target" "seeds/$target" -- \
            -max_total_time={{seconds}} -max_len=65536 -timeout=10 -rss_limit_mb=2048 > "$log" 2>&1 || true
        printf '%-16s %s\n' "$target" "$(grep -E '^Done|SUMMARY|panicked|deadly signal|Test unit written' "$log" | tr '\n' ' ')"
    }
    running=0
    for target in $(cargo fuzz list); do
        if [ "$running" -ge "$(nproc)" ]; then wait -n; running=$((running - 1)); fi
        one "$target" &
        running=$((running + 1))
    done
    wait
    found=0
    for target in $(cargo fuzz list); do
        if ls "artifacts/$target"/* >/dev/null 2>&1; then
            echo "fuzz target $target found a crash: fuzz/artifacts/$target (log: target/fuzz-logs/$target.log)" >&2
            found=1
        fi
    done
    exit "$found"

# Run the simulator, e.g. `just sim run --seed 7 --scenario hold --verbose`.
sim *args:
    cargo run -q -p sim -- {{args}}

# Two replicas, Postgres, Redis, agents and SSH hosts in network namespaces, faults from a
# seeded schedule: `just chaos --seed 7 --duration 10m`, `--duration 1h`, `--help`.
# Real processes, real faults (as root), every invariant checked from the evidence they leave.
chaos *args:
    cargo build -q --bins
    ./target/debug/outpost-chaos {{args}}

# The chaos seeds CI replays (chaos/seeds: one `SEED DURATION` per line), each to a valid end.
chaos-seeds:
    cargo build -q --bins
    bash scripts/chaos-seeds.sh

# Benchmarks, printed next to their targets (README, Benchmarks). Areas: sim, tasks, buffer, alerts, ssh, terminal, fleet.
bench area="sim":
    #!/usr/bin/env bash
    set -euo pipefail
    case "{{area}}" in
      sim)
        cargo build -q -p sim
        echo "target: simulated time >= 500x wall time; 200 seeds in CI in <= 5 min"
        start=$(date +%s%N)
        ./target/debug/sim run --seed 1000 --seeds 50 2>&1 | tail -2
        end=$(date +%s%N)
        echo "200 seed runs (50 seeds x 4 scenarios) took $(( (end - start) / 1000000 )) ms wall"
        ;;
      tasks)
        python3 -m pip install --quiet huey >/dev/null 2>&1 || echo "could not install huey (pip): the SqliteHuey column stays empty" >&2
        cargo bench -q -p agent --bench tasks
        ;;
      buffer)
        cargo bench -q -p agent --bench buffer
        ;;
      alerts)
        cargo bench -q -p control-plane --bench alerts
        ;;
      ssh)
        # The peers, installed here so the comparison runs in the same session.
        command -v parallel-ssh >/dev/null || apt-get install -y -q pssh >/dev/null 2>&1 || echo "could not install pssh (apt): its row stays empty" >&2
        python3 -c 'import pssh.clients' 2>/dev/null || python3 -m pip install --quiet parallel-ssh >/dev/null 2>&1 || echo "could not install parallel-ssh (pip): its row stays empty" >&2
        command -v ansible >/dev/null || python3 -m pip install --quiet ansible-core >/dev/null 2>&1 || echo "could not install ansible-core (pip): its row stays empty" >&2
        cargo build -q --release --bin outpost
        cargo bench -q -p remote-exec --bench ssh
        ;;
      terminal)
        # The peer, WeTTY, installed here so it is measured in the same run.
        wetty_dir="$PWD/target/wetty"
        mkdir -p "$wetty_dir"
        if [ ! -x "$wetty_dir/node_modules/.bin/wetty" ]; then
          (cd "$wetty_dir" && npm install --no-audit --no-fund --loglevel=error wetty socket.io-client >/dev/null 2>&1) || echo "could not install wetty (npm): its column stays empty" >&2
        fi
        [ -x "$wetty_dir/node_modules/.bin/wetty" ] && export OUTPOST_WETTY_DIR="$wetty_dir"
        cargo build -q --release --bins
        cargo bench -q -p agent --bench terminal
        ;;
      fleet)
        # Every simulated agent holds a socket on each side: the soft open-files limit up to
        # the hard one (10,000 agents need about 10,100 in each process).
        ulimit -n "$(ulimit -Hn)"
        echo "open-files limit: $(ulimit -n)"
        cargo build -q --release --bins
        cargo bench -q -p agent --bench fleet
        ;;
      *) echo "unknown bench area '{{area}}'; available: sim, tasks, buffer, alerts, ssh, terminal, fleet" >&2; exit 2 ;;
    esac

fmt:
    cargo fmt --all

fmt-check:
    cargo fmt --all -- --check

# Clippy with warnings as errors; clippy.toml enforces the world seam.
lint:
    cargo clippy --workspace --all-targets -- -D warnings
