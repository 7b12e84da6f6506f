#!/usr/bin/env bash
# A real two-"host" DeepSpeed launch on this machine: pdsh over ssh to 127.0.0.1 and 127.0.0.2.
#
#   tests/multinode/run_two_hosts.sh              (make test-multinode): train 6 steps, checkpoint
#   tests/multinode/run_two_hosts.sh --kill-rank R  kill -9 global rank R (node R's rank) after step 2:
#                                                   the launch must exit non-zero within 90 s, naming it
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

kill_rank=
case ${1:-} in
    --kill-rank) kill_rank=${2:?--kill-rank needs 0 or 1} ;;
    "") ;;
    *) echo "usage: $0 [--kill-rank 0|1]" >&2; exit 2 ;;
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
