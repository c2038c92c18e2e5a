# Sourced by `just test`: every cargo call after it compiles the workspace's own crates through
# clippy-driver with warnings denied, as `cargo clippy --workspace --all-targets -- -D warnings`
# (`just lint`) does, but with code generation: the build that the tests, the simulator and the
# chaos suite use is the linted one. Cargo keys the artifacts on the wrapper, so a plain
# `cargo build` afterwards recompiles the workspace's crates (not their dependencies).
driver=$(rustup which clippy-driver 2>/dev/null || command -v clippy-driver || true)
if [ -z "$driver" ]; then
    echo "error: clippy-driver not found: install clippy (rustup component add clippy)" >&2
    return 1
fi
export RUSTC_WORKSPACE_WRAPPER=$driver
# What `cargo clippy -- -D warnings` hands clippy-driver: its arguments, each followed by the
# separator it splits on.
export CLIPPY_ARGS="-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__"
# That hand-over is clippy's own convention, not a documented interface: prove it still denies
# a clippy lint, so a changed convention fails here instead of letting lints pass unseen.
probe=$(mktemp -d)
printf 'fn main() {\n    let v = vec![1];\n    println!("{}", v.len() == 0);\n}\n' > "$probe/probe.rs"
if "$driver" rustc --edition 2021 --crate-type bin --out-dir "$probe" "$probe/probe.rs" > "$probe/log" 2>&1 \
    || ! grep -q 'clippy::len_zero' "$probe/log"; then
    cat "$probe/log" >&2
    rm -rf "$probe"
    echo "error: clippy-driver did not deny a clippy lint through CLIPPY_ARGS: run \`just lint\` instead" >&2
    return 1
fi
rm -rf "$probe"
# One build from scratch, never edited in between: incremental compilation's bookkeeping would
# only cost time and disk.
export CARGO_INCREMENTAL=0
