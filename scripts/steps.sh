# Timed steps for `just test`: `step NAME COMMAND...` runs COMMAND, and when the shell exits
# (passing or not) a table of every step's wall time is printed, the failed one marked.
# Sourced, not run.

_steps_names=()
_steps_secs=()
_steps_failed=""
_steps_started=$(date +%s)

step() {
    local name=$1
    shift
    echo "== $name: $*"
    local start=$SECONDS
    if "$@"; then
        _steps_names+=("$name")
        _steps_secs+=($((SECONDS - start)))
    else
        local rc=$?
        _steps_names+=("$name")
        _steps_secs+=($((SECONDS - start)))
        _steps_failed=$name
        return "$rc"
    fi
}

# `background NAME COMMAND...` starts COMMAND at the lowest CPU priority, its output in
# target/steps/NAME.log, so it uses what the wall-bound steps that follow leave idle;
# `await NAME` waits for it (a step of its own: the time spent waiting) and fails as it did.
# Its own wall time is a row of the table too.
# `alongside NAME COMMAND...` is the same at normal priority, for a job that has timers of its
# own and runs beside steps that mostly wait.
declare -A _bg_pid _bg_start
_start_job() {
    local niceness=$1 name=$2
    shift 2
    mkdir -p target/steps
    echo "== $name (in the background, log target/steps/$name.log): $*"
    _bg_start[$name]=$SECONDS
    ( trap - EXIT; exec nice -n "$niceness" "$@" > "target/steps/$name.log" 2>&1 ) &
    _bg_pid[$name]=$!
}
background() { _start_job 19 "$@"; }
# `background_first NAME COMMAND...`: a background job a later step waits for, ahead of the
# other background jobs in what the steps leave idle (nice 15 against 19: about two thirds).
background_first() { _start_job 15 "$@"; }
alongside() { _start_job 0 "$@"; }
await() {
    local name=$1 rc=0
    wait "${_bg_pid[$name]}" || rc=$?
    unset "_bg_pid[$name]"
    _steps_names+=("$name (background)")
    _steps_secs+=($((SECONDS - ${_bg_start[$name]})))
    if [ "$rc" != 0 ]; then
        tail -40 "target/steps/$name.log"
        echo "$name failed (exit $rc); its log: target/steps/$name.log"
        return "$rc"
    fi
}

_steps_report() {
    local i pid total=$(( $(date +%s) - _steps_started ))
    # A step failed before a background job was awaited: stop it.
    for pid in "${_bg_pid[@]}"; do kill "$pid" 2>/dev/null || true; done
    echo
    echo "step times (wall):"
    for i in "${!_steps_names[@]}"; do
        local mark=""
        [ "${_steps_names[$i]}" = "$_steps_failed" ] && mark="  FAILED"
        printf '  %-22s %5d s%s\n' "${_steps_names[$i]}" "${_steps_secs[$i]}" "$mark"
    done
    printf '  %-22s %5d s\n' "total" "$total"
}
trap _steps_report EXIT
