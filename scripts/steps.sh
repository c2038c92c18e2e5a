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

_steps_report() {
    local i total=$(( $(date +%s) - _steps_started ))
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
