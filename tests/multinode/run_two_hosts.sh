#!/usr/bin/env bash
# A real two-"host" DeepSpeed launch on this machine: pdsh over ssh to 127.0.0.1 and 127.0.0.2.
#
#   tests/multinode/run_two_hosts.sh              (make test-multinode): train 6 steps, checkpoint
#   tests/multinode/run_two_hosts.sh --kill-rank R  kill -9 global rank R (node R's rank) after step 2:
#                                                   the launch must exit non-zero within 90 s, naming it
#   tests/multinode/run_two_hosts.sh --hostile      values with $(...), backticks, ';' for the nodes' shell:
#                                                   DeepSpeed's runner alone runs them (control), launch.sh
#                                                   refuses them naming each (no marker file appears), and
#                                                   values with spaces, quotes and ;|() arrive verbatim
#
# Starts a private sshd bound to loopback only (127.0.0.1 and 127.0.0.2, a free high port), key
# authentication only, with a host key, a user key, known_hosts and an ssh_config all generated in a
# temporary directory; ~/.ssh is never read or written (ssh is a wrapper adding -F that ssh_config).
# Then ./launch.sh with a two-line hostfile (slots=1 each), --launcher pdsh: one rank per node, world
# size 2, ZeRO-2 with the Partial FC head sharded across both. Checks the node ranks in the output,
# the world size in training.log, the env forwarding (DS_FACE_TIMEOUT_MIN) and the final checkpoint.
# Everything it started (sshd, leftover ranks) is stopped and the directory removed on any exit.
# Needs: sshd and pdsh (Debian: apt-get install -y openssh-server pdsh), the venv's deepspeed on PATH.
set -euo pipefail

kill_rank= hostile=
case ${1:-} in
    --kill-rank) kill_rank=${2:?--kill-rank needs 0 or 1} ;;
    --hostile) hostile=1 ;;
    "") ;;
    *) echo "usage: $0 [--kill-rank 0|1 | --hostile]" >&2; exit 2 ;;
esac
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
if [ -x .venv/bin/deepspeed ]; then PATH=$root/.venv/bin:$PATH; fi
sshd_bin=$(command -v sshd || echo /usr/sbin/sshd)
for tool in "$sshd_bin" pdsh ssh ssh-keygen deepspeed; do
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

if [ -n "$hostile" ]; then
    fail() { echo "run_two_hosts: FAIL: $*" >&2; exit 1; }
    # Control: DeepSpeed's pdsh runner by itself runs a $(...) from an exported value on every node.
    printf 'DS_FACE_TIMEOUT_MIN=3$(touch %s/control_marker)\n' "$tmp" > "$tmp/evil_env"
    DS_ENV_FILE=$tmp/evil_env timeout 120 deepspeed --hostfile "$tmp/hostfile" --launcher pdsh \
        --master_addr 127.0.0.1 --master_port "$master_port" --no_python --no_local_rank /bin/true \
        > "$tmp/control.log" 2>&1 || true
    ls "$tmp"/control_*marker >/dev/null 2>&1 || { cat "$tmp/control.log" >&2; fail "control: the runner did not run \$(...)"; }
    echo "run_two_hosts: control: DeepSpeed's runner alone ran \$(touch ...) from an exported value"

    # launch.sh: each hostile value is refused, naming it, and nothing runs anywhere.
    refused=0
    try_hostile() {  # try_hostile NAME [ENV=VALUE] -- launch.sh arguments...
        local name=$1; shift
        local envs=()
        while [ "$1" != -- ]; do envs+=("$1"); shift; done; shift
        set +e
        env "${envs[@]+"${envs[@]}"}" timeout 60 "$root/launch.sh" "$root/configs/cpu_demo.yaml" \
            "$root/ds_configs/cpu_zero2_fp32.json" --hostfile "$tmp/hostfile" --master_addr 127.0.0.1 \
            --master_port "$master_port" --launcher pdsh --set "output.dir=$tmp/refused" "$@" > "$tmp/h.log" 2>&1
        local rc=$?
        set -e
        [ "$rc" -eq 2 ] || { cat "$tmp/h.log" >&2; fail "$name: launch.sh exited $rc, expected 2"; }
        grep -q "launch.sh: error: values that would not reach the other nodes verbatim" "$tmp/h.log" \
            || { cat "$tmp/h.log" >&2; fail "$name: no refusal message"; }
        ! ls "$tmp"/pwned* >/dev/null 2>&1 || fail "$name: a marker file appeared: $(ls "$tmp"/pwned*)"
        [ ! -e "$tmp/refused" ] || fail "$name: the run started ($tmp/refused exists)"
        echo "run_two_hosts: refused $name: $(grep -A3 'launch.sh: error' "$tmp/h.log" | tail -n +2 | head -1 | sed 's/^ *//')"
        refused=$((refused + 1))
    }
    try_hostile "env \$(...)" "DS_FACE_TIMEOUT_MIN=10\$(touch $tmp/pwned1)" --
    try_hostile "env backticks" "DS_FACE_TIMEOUT_MIN=10\`touch $tmp/pwned2\`" --
    try_hostile "env double quote" "DS_FACE_NOTE=a\"; touch $tmp/pwned3; echo \"" --
    try_hostile "NCCL_* env" "NCCL_DEBUG=\$(touch $tmp/pwned4)" --
    try_hostile "--set \$(...)" -- --set "output.log_every=\$(touch $tmp/pwned5)"
    try_hostile "--set backticks" -- --set "output.log_every=\`touch $tmp/pwned6\`"
    try_hostile "--set ;" -- --set "output.dir=x;touch>$tmp/pwned7"
    try_hostile "--set glob" -- --set "head.margin=[1.0,0.5,0.0]"
    printf 'DS_FACE_X=$(touch %s/pwned8)\n' "$tmp" > "$tmp/user_env"
    try_hostile "a DS_ENV_FILE line" "DS_ENV_FILE=$tmp/user_env" --
    echo "run_two_hosts: refused $refused hostile launches, no marker file"

    # Values that the shell would misread if DeepSpeed's quoting were not enough arrive verbatim:
    # output.dir with spaces, ; | ( ) and a single quote; a YAML list with spaces; an env value with spaces.
    out="$tmp/run dir (a;b|c'd)"
    set +e
    DS_FACE_TIMEOUT_MIN=3 DS_FACE_NOTE="two words; and 'quotes'" timeout -k 10 "${TWO_HOSTS_TIMEOUT_S:-300}" \
        "$root/launch.sh" "$root/configs/cpu_demo.yaml" "$root/ds_configs/cpu_zero2_fp32.json" \
        --hostfile "$tmp/hostfile" --master_addr 127.0.0.1 --master_port "$master_port" --launcher pdsh \
        --set schedule.max_steps=2 --set output.log_every=1 --set "head.margin=[1.0, 0.4, 0.0]" \
        --set "output.dir=$out" > "$tmp/verbatim.log" 2>&1
    rc=$?
    set -e
    [ "$rc" -eq 0 ] || { tail -n 40 "$tmp/verbatim.log" >&2; fail "verbatim launch exited $rc"; }
    grep -q 'Global Step: 2/2' "$out/training.log" || fail "no training.log in '$out'"
    grep -q "export DS_FACE_NOTE=\"two words; and 'quotes'\";" "$tmp/verbatim.log" || fail "DS_FACE_NOTE not sent quoted"
    ! ls "$tmp"/pwned* >/dev/null 2>&1 || fail "a marker file appeared"
    echo "run_two_hosts: OK: hostile values refused ($refused), control ran, values with spaces/quotes arrived verbatim"
    exit 0
fi
out=$tmp/run
log=$tmp/launch.log
start=$(date +%s)
steps=6
[ -n "$kill_rank" ] && steps=300  # minutes of training: the kill comes long before the end
set +e
DS_FACE_TIMEOUT_MIN=3 timeout -k 10 "${TWO_HOSTS_TIMEOUT_S:-300}" \
    ./launch.sh configs/cpu_demo.yaml ds_configs/cpu_zero2_fp32.json \
        --hostfile "$tmp/hostfile" --master_addr 127.0.0.1 --master_port "$master_port" --launcher pdsh \
        --set schedule.max_steps=$steps --set output.log_every=1 --set "output.dir=$out" > "$log" 2>&1 &
launch_pid=$!
set -e
fail() { echo "run_two_hosts: FAIL: $*" >&2; tail -n 60 "$log" >&2; exit 1; }

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
grep -q '^127\.0\.0\.1: .*node_rank=0' "$log" || fail "no node_rank=0 line from host 127.0.0.1"
grep -q '^127\.0\.0\.2: .*node_rank=1' "$log" || fail "no node_rank=1 line from host 127.0.0.2"
grep -q 'export DS_FACE_TIMEOUT_MIN=3;' "$log" || fail "DS_FACE_TIMEOUT_MIN not forwarded to the nodes"
grep -q 'world size 2, ZeRO stage 2, fp32' "$out/training.log" || fail "training.log: no 'world size 2'"
grep -q 'Global Step: 6/6' "$out/training.log" || fail "training.log: step 6 not reached"
[ -f "$out/checkpoints/latest" ] || fail "no checkpoint ($out/checkpoints/latest)"
step=$(cat "$out/checkpoints/latest")
ls "$out/checkpoints/$step" > "$tmp/ckpt_files"
echo "run_two_hosts: OK: 2 nodes x 1 rank, checkpoint $step: $(tr '\n' ' ' < "$tmp/ckpt_files")"
