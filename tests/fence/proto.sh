# Sourced by the fake fence agents: the fence-agents stdin protocol.
# Reads `key=value` lines (blank lines and '#' comments skipped) until EOF
# into OPT, and records what this run received, so that the tests can check
# where the password went:
#   $state.stdin  every stdin line, appended per run
#   $state.argv   "$0 args...", one line per run
#   $state.env    the environment, appended per run
# The option `state=PATH` names the state file ("on" or "off"; missing = on).
declare -A OPT
stdin_text=""
while IFS= read -r line || [ -n "$line" ]; do
    stdin_text+="$line"$'\n'
    case "$line" in '' | '#'*) continue ;; esac
    OPT["${line%%=*}"]="${line#*=}"
done
state="${OPT[state]:-}"
if [ -z "$state" ]; then
    echo "Failed: option state= is missing" >&2
    exit 1
fi
printf '%s' "$stdin_text" >>"$state.stdin"
printf '%s\n' "$0 $*" >>"$state.argv"
env >>"$state.env"

# The state file's power state: on or off.
power() { if [ "$(cat "$state" 2>/dev/null)" = off ]; then echo off; else echo on; fi; }
