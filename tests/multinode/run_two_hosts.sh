#!/usr/bin/env bash
# Real two-"host" launches on this machine through launch.sh's multi-node runner (ds_face/launch/multinode.py):
# one ssh per host to 127.0.0.1 and 127.0.0.2.
#
#   tests/multinode/run_two_hosts.sh              (make test-multinode): train 6 steps, checkpoint
#   tests/multinode/run_two_hosts.sh --kill-rank R  kill -9 global rank R (node R's rank) after step 2:
#                                                   the launch must exit non-zero within 90 s, naming it
#   tests/multinode/run_two_hosts.sh --hostile      control (where pdsh is installed): DeepSpeed's pdsh runner
#                                                   alone runs a $(...) from an exported value; then hostile
#                                                   arguments, environment values, working directory and venv
#                                                   script arrive verbatim on both hosts (transport.py, which
#                                                   also kill -9s a launcher), and a real launch.sh training
#                                                   started from a directory named with a space and $(...),
#                                                   with hostile --venv_script, --enable_each_rank_log,
#                                                   output.dir and env values, runs with no marker file and
#                                                   passes every check of the plain run (6 steps, checkpoint):
#                                                   one launch for both in tests/test_multinode.py
#   tests/multinode/run_two_hosts.sh --stop         two launches from the same venv on the same two nodes:
#                                                   SIGTERM to the first stops all of its processes on both,
#                                                   the second trains on to its end
#
# Starts a private sshd bound to loopback only (127.0.0.1 and 127.0.0.2, a free high port), key
# authentication only, with a host key, a user key, known_hosts and an ssh_config all generated in a
# temporary directory; ~/.ssh is never read or written (ssh is a wrapper adding -F that ssh_config).
# The hostfile has two lines (slots=1 each): one rank per node, world size 2, ZeRO-2 with the Partial FC
# head sharded across both. Everything it started (sshd, leftover ranks) is stopped and the directory
# removed on any exit. Needs: sshd (Debian: apt-get install -y openssh-server openssh-client; pdsh for the
# control), the venv's deepspeed on PATH.
set -euo pipefail

kill_rank= hostile= stop=
case ${1:-} in
    --kill-rank) kill_rank=${2:?--kill-rank needs 0 or 1} ;;
    --hostile) hostile=1 ;;
    --stop) stop=1 ;;
    "") ;;
    *) echo "usage: $0 [--kill-rank 0|1 | --hostile | --stop]" >&2; exit 2 ;;
esac
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
if [ -x .venv/bin/deepspeed ]; then PATH=$root/.venv/bin:$PATH; fi
sshd_bin=$(command -v sshd || echo /usr/sbin/sshd)
for tool in "$sshd_bin" ssh ssh-keygen deepspeed; do
    command -v "$tool" >/dev/null || { echo "run_two_hosts: error: $tool not found" >&2; exit 3; }
done
python_bin=$(dirname "$(command -v deepspeed)")/python

tmp=$(mktemp -d /tmp/ds_face_2hosts.XXXXXX)
sshd_pid=
cleanup() {
    status=$?
    set +e
    [ -n "$sshd_pid" ] && kill "$sshd_pid" 2>/dev/null
    # Ranks (or launchers) left behind by a failed run: only processes whose command line names $tmp.
    for pid in $(pgrep -f -- "$tmp" || true); do
        [ "$pid" != $$ ] && kill -9 "$pid" 2>/dev/null
    done
    [ -n "$sshd_pid" ] && wait "$sshd_pid" 2>/dev/null
    rm -rf "$tmp"
    exit $status
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port=$("$python_bin" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
master_port=$("$python_bin" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

ssh-keygen -q -t ed25519 -N '' -f "$tmp/host_key"
ssh-keygen -q -t ed25519 -N '' -f "$tmp/user_key"
cp "$tmp/user_key.pub" "$tmp/authorized_keys"
chmod 600 "$tmp/authorized_keys"
cat > "$tmp/sshd_config" <<EOF
Port $port
ListenAddress 127.0.0.1
ListenAddress 127.0.0.2
HostKey $tmp/host_key
PidFile $tmp/sshd.pid
AuthorizedKeysFile $tmp/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
X11Forwarding no
AllowTcpForwarding no
PermitUserEnvironment no
LogLevel ERROR
EOF
cat > "$tmp/ssh_config" <<EOF
Host 127.0.0.1 127.0.0.2
    Port $port
    IdentityFile $tmp/user_key
    IdentitiesOnly yes
    UserKnownHostsFile $tmp/known_hosts
    StrictHostKeyChecking no
    PasswordAuthentication no
    BatchMode yes
    LogLevel ERROR
EOF
mkdir -p "$tmp/bin"
printf '#!/bin/sh\nexec %s -F %s "$@"\n' "$(command -v ssh)" "$tmp/ssh_config" > "$tmp/bin/ssh"
chmod +x "$tmp/bin/ssh"
export PATH=$tmp/bin:$PATH  # pdsh and the runner's ssh check both run `ssh`

mkdir -p /run/sshd 2>/dev/null || true  # sshd's privilege-separation directory
"$sshd_bin" -D -f "$tmp/sshd_config" -E "$tmp/sshd.log" &
sshd_pid=$!
for _ in $(seq 50); do
    ssh 127.0.0.1 true 2>/dev/null && ssh 127.0.0.2 true 2>/dev/null && break
    kill -0 "$sshd_pid" 2>/dev/null || { echo "run_two_hosts: error: sshd exited:" >&2; cat "$tmp/sshd.log" >&2; exit 1; }
    sleep 0.2
done
ssh 127.0.0.2 true || { echo "run_two_hosts: error: no ssh to 127.0.0.2:$port" >&2; cat "$tmp/sshd.log" >&2; exit 1; }

printf '# two "nodes" on this machine\n127.0.0.1 slots=1\n127.0.0.2 slots=1\n' > "$tmp/hostfile"

# What a finished two-host training run shows: each node's output prefixed with its host, DS_FACE_TIMEOUT_MIN
# exported to both, 2 ranks of ZeRO-2 fp32, step 6 reached, a checkpoint saved. (`fail` is each mode's own.)
steps=6
check_trained() {  # check_trained LAUNCH_LOG OUTPUT_DIR
    grep -q '^127\.0\.0\.1: .*node_rank=0' "$1" || fail "no node_rank=0 line from host 127.0.0.1"
    grep -q '^127\.0\.0\.2: .*node_rank=1' "$1" || fail "no node_rank=1 line from host 127.0.0.2"
    grep -q '^ds_face.launch.multinode: 2 host(s): 127.0.0.1, 127.0.0.2 (one ssh each); exporting .*DS_FACE_TIMEOUT_MIN' "$1" \
        || fail "DS_FACE_TIMEOUT_MIN not forwarded to the nodes"
    grep -q 'world size 2, ZeRO stage 2, fp32' "$2/training.log" || fail "training.log: no 'world size 2'"
    grep -q "Global Step: $steps/$steps" "$2/training.log" || fail "training.log: step $steps not reached"
    [ -f "$2/checkpoints/latest" ] || fail "no checkpoint ($2/checkpoints/latest)"
    local step
    step=$(cat "$2/checkpoints/latest")
    ls "$2/checkpoints/$step" > "$tmp/ckpt_files"
    echo "run_two_hosts: OK: 2 nodes x 1 rank, checkpoint $step: $(tr '\n' ' ' < "$tmp/ckpt_files")"
}

if [ -n "$hostile" ]; then
    fail() { echo "run_two_hosts: FAIL: $*" >&2; exit 1; }
    # Control (where pdsh is installed): DeepSpeed's pdsh runner by itself runs a $(...) from an exported value
    # on every node. launch.sh no longer uses it (ds_face/launch/multinode.py).
    if command -v pdsh >/dev/null; then
        printf 'DS_FACE_TIMEOUT_MIN=3$(touch %s/control_marker)\n' "$tmp" > "$tmp/evil_env"
        DS_ENV_FILE=$tmp/evil_env timeout 120 deepspeed --hostfile "$tmp/hostfile" --launcher pdsh \
            --master_addr 127.0.0.1 --master_port "$master_port" --no_python --no_local_rank /bin/true \
            > "$tmp/control.log" 2>&1 || true
        [ -e "$tmp/control_marker" ] || { cat "$tmp/control.log" >&2; fail "control: the runner did not run \$(...)"; }
        rm "$tmp/control_marker"
        echo "run_two_hosts: control: DeepSpeed's runner alone ran \$(touch ...) from an exported value"
    fi

    # ds_face.launch.multinode's transport: hostile arguments, environment values, working directory and venv script
    # arrive verbatim on both hosts; kill -9 of a launcher stops its processes only.
    "$python_bin" "$root/tests/multinode/transport.py" "$tmp" || fail "transport checks"

    # A real training launch through launch.sh, started from a directory whose name holds a space, quotes and
    # $(...), with a hostile --venv_script path, --enable_each_rank_log directory, output.dir, an exported
    # value, a .deepspeed_env value and a YAML list without spaces (glob characters): all arrive verbatim.
    # It is also the plain run's training (check_trained): one launch for both.
    # (a name cannot hold '/': these markers are relative, looked for wherever a shell could have run them)
    here="$tmp/launch dir \$(touch pwned30) 'q'"
    logs="$tmp/rank logs;\`touch pwned31\`"
    venv="$tmp/venv script \$(touch pwned32).sh"
    out="$tmp/run dir (a;b|c'd) \$(touch pwned33)"
    mkdir -p "$here"
    printf 'echo "$$" >> %q\n' "$tmp/sourced" > "$venv"
    printf 'DS_FACE_ENV_FILE_VALUE=$(touch %s/pwned34) `x` "y"\n' "$tmp" > "$here/.deepspeed_env"
    set +e
    (cd "$here" && DS_FACE_TIMEOUT_MIN=3 DS_FACE_NOTE="two words; \$(touch $tmp/pwned35) and 'quotes'" \
        timeout -k 10 "${TWO_HOSTS_TIMEOUT_S:-300}" "$root/launch.sh" "$root/configs/cpu_demo.yaml" \
        "$root/ds_configs/cpu_zero2_fp32.json" --hostfile "$tmp/hostfile" --master_addr 127.0.0.1 \
        --master_port "$master_port" --launcher pdsh --venv_script "$venv" --enable_each_rank_log "$logs" \
        --set schedule.max_steps=$steps --set output.log_every=1 --set "head.margin=[1.0,0.4,0.0]" \
        --set "output.dir=$out") > "$tmp/verbatim.log" 2>&1
    rc=$?
    set -e
    [ "$rc" -eq 0 ] || { tail -n 40 "$tmp/verbatim.log" >&2; fail "verbatim launch exited $rc"; }
    grep -q "Global Step: $steps/$steps" "$out/training.log" || fail "no training.log in '$out'"
    grep -q 'world size 2' "$out/training.log" || fail "not 2 ranks"
    grep -q '^127\.0\.0\.2: .*node_rank=1' "$tmp/verbatim.log" || fail "no node_rank=1 from 127.0.0.2"
    [ "$(ls "$logs" | grep -c '_rank[01]\.log$')" = 2 ] || fail "no per-rank logs in '$logs': $(ls "$logs")"
    [ "$(wc -l < "$tmp/sourced")" = 2 ] || fail "the venv script was not sourced once per node"
    grep -q 'exporting .*DS_FACE_ENV_FILE_VALUE' "$tmp/verbatim.log" || fail ".deepspeed_env line not exported"
    markers=$(ls -d "$tmp"/pwned* "$here"/pwned* "$HOME"/pwned* "$root"/pwned* "$logs"/pwned* 2>/dev/null || true)
    [ -z "$markers" ] || fail "a marker file appeared: $markers"
    echo "run_two_hosts: OK: launch from '$here' with hostile venv script, rank-log dir, output.dir and env arrived verbatim, no marker"
    check_trained "$tmp/verbatim.log" "$out"
    exit 0
fi

if [ -n "$stop" ]; then
    fail() { tail -n 40 "$tmp/first.log" "$tmp/second.log" >&2; echo "run_two_hosts: FAIL: $*" >&2; exit 1; }
    # Two two-host launches from the same venv on the same two nodes; SIGTERM to the first launch.sh stops all
    # of its processes on both nodes, and only them: the second trains on to its end.
    second_port=$("$python_bin" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    start_launch() {  # start_launch NAME PORT STEPS
        DS_FACE_TIMEOUT_MIN=3 timeout -k 10 "${TWO_HOSTS_TIMEOUT_S:-400}" ./launch.sh configs/cpu_demo.yaml \
            ds_configs/cpu_zero2_fp32.json --hostfile "$tmp/hostfile" --master_addr 127.0.0.1 --master_port "$2" \
            --set schedule.max_steps="$3" --set output.log_every=1 --set "output.dir=$tmp/$1" > "$tmp/$1.log" 2>&1 &
    }
    wait_step() {  # wait_step NAME PID STEP
        until grep -q "Global Step: $3/" "$tmp/$1/training.log" 2>/dev/null; do
            kill -0 "$2" 2>/dev/null || fail "$1 ended before step $3"
            sleep 0.5
        done
    }
    start_launch first "$master_port" 300
    first_pid=$!
    wait_step first "$first_pid" 1
    start_launch second "$second_port" 8
    second_pid=$!
    wait_step second "$second_pid" 1
    [ "$(pgrep -f -- "output.dir=$tmp/first" | wc -l)" -ge 6 ] || fail "the first launch's processes not found"
    # SIGTERM to launch.sh itself (it exec'd ds_face.launch.multinode), not to `timeout`, whose -k would SIGKILL it
    # 10 s later while it is still stopping the nodes
    runner_pid=$(pgrep -P "$first_pid")
    tr '\0' ' ' < "/proc/$runner_pid/cmdline" | grep -q -- '-m ds_face.launch.multinode' || fail "launch.sh's runner not found"
    kill -TERM "$runner_pid"
    stopped=$(date +%s)
    set +e
    wait "$first_pid"; first_rc=$?
    set -e
    took=$(( $(date +%s) - stopped ))
    [ "$first_rc" -ne 0 ] || fail "the stopped launch exited 0"
    left=$(pgrep -f -- "output.dir=$tmp/first" || true)
    [ -z "$left" ] || fail "the first launch left processes: $(ps -o pid,args -p "$(echo $left | tr ' ' ,)")"
    kill -0 "$second_pid" 2>/dev/null || fail "the second launch died with the first"
    set +e
    wait "$second_pid"; second_rc=$?
    set -e
    [ "$second_rc" -eq 0 ] || fail "the second launch exited $second_rc"
    grep -q 'Global Step: 8/8' "$tmp/second/training.log" || fail "the second launch did not reach step 8"
    [ "$(cat "$tmp/second/checkpoints/latest")" = step_8 ] || fail "the second launch saved no step_8"
    echo "run_two_hosts: OK: SIGTERM stopped the first launch on both nodes in $took s (exit $first_rc), none of its processes left; the second finished step 8"
    exit 0
fi
out=$tmp/run
log=$tmp/launch.log
start=$(date +%s)
[ -n "$kill_rank" ] && steps=300  # minutes of training: the kill comes long before the end
set +e
DS_FACE_TIMEOUT_MIN=3 timeout -k 10 "${TWO_HOSTS_TIMEOUT_S:-300}" \
    ./launch.sh configs/cpu_demo.yaml ds_configs/cpu_zero2_fp32.json \
        --hostfile "$tmp/hostfile" --master_addr 127.0.0.1 --master_port "$master_port" --launcher pdsh \
        --set schedule.max_steps=$steps --set output.log_every=1 --set "output.dir=$out" > "$log" 2>&1 &
launch_pid=$!
set -e
fail() { tail -n 60 "$log" >&2; echo "run_two_hosts: FAIL: $*" >&2; exit 1; }

if [ -n "$kill_rank" ]; then
    until grep -q 'Global Step: 2/' "$out/training.log" 2>/dev/null; do
        kill -0 "$launch_pid" 2>/dev/null || fail "the launch ended before step 2"
        sleep 0.5
    done
    # node R's one rank: the ds_face.train whose parent, deepspeed's launch.py, has --node_rank=R (pdsh's %n)
    victim=
    for pid in $(pgrep -f -- "-m ds_face.train --local_rank=0 .*output.dir=$out"); do
        parent=$(ps -o ppid= -p "$pid" | tr -d ' ')
        if tr '\0' ' ' < "/proc/$parent/cmdline" | grep -q -- "--node_rank=$kill_rank "; then victim=$pid; fi
    done
    [ -n "$victim" ] || fail "no rank found for node $kill_rank"
    kill -9 "$victim"
    killed=$(date +%s)
fi

set +e
wait "$launch_pid"; rc=$?
set -e
echo "run_two_hosts: launch exited $rc after $(( $(date +%s) - start )) s"
if [ -n "${TWO_HOSTS_LOG:-}" ]; then cp "$log" "$TWO_HOSTS_LOG"; fi  # keep the launcher output

if [ -n "$kill_rank" ]; then
    took=$(( $(date +%s) - killed ))
    survivor=$(( 1 - kill_rank ))
    [ "$rc" -ne 0 ] || fail "launch exit status 0 after rank $kill_rank was killed"
    [ "$took" -le 90 ] || fail "the launch took $took s to stop after rank $kill_rank died"
    grep -q "^127\.0\.0\.$(( kill_rank + 1 )): .*exits with return code = -9" "$log" \
        || fail "node $kill_rank's launcher did not report the killed rank"
    grep -q "^127\.0\.0\.$(( survivor + 1 )): ds_face.train: rank $survivor: error: .*another node" "$log" \
        || fail "rank $survivor did not say why it stopped"
    echo "run_two_hosts: OK: rank $kill_rank killed, launch exited $rc within $took s, rank $survivor stopped too"
    exit 0
fi

[ "$rc" -eq 0 ] || fail "launch exit status $rc"
check_trained "$log" "$out"
