"""ds_face.launch.multinode's transport over real ssh to 127.0.0.1 and 127.0.0.2 (run by run_two_hosts.sh --hostile,
after it has started the private sshd and put its ssh wrapper on PATH).

    python tests/multinode/transport.py TMPDIR

1. Verbatim: one run_on_hosts call sends hostile values as arguments, as environment values, in the working
   directory's name and in the --venv_script path; each node prints what its process received (JSON) and it
   must equal what was sent, on both hosts; no marker file may appear (each value tries to create one).
2. kill -9 of the launcher: a launcher running ``sleep`` on both hosts is killed outright; the nodes' sleeps
   (and their guards) must be gone within NODE_STOP_S, and a second launch's sleeps, started the same way
   from the same venv, must still run.
Prints one line per value ("verbatim: ...") and "transport: OK ..." at the end; exit 1 on any failure.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ds_face.launch.multinode import NODE_STOP_S, run_on_hosts

HOSTS = ("127.0.0.1", "127.0.0.2")


def fail(message):
    print(f"transport: FAIL: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def hostile_values(tmp: Path) -> dict[str, str]:
    m = f"{tmp}/pwned"
    return {
        "space": "two words",
        "command substitution": f"$(touch {m}1)",
        "backticks": f"`touch {m}2`",
        "semicolon": f"x;touch {m}3",
        "quotes": f"a'b\"c'\"; touch {m}4; echo \"",
        "backslashes": "a\\b\\\\c\\",
        "newline": f"line1\ntouch {m}5",
        "carriage return": f"a\rtouch {m}6",
        "tab": "a\tb",
        "glob": "* ? [a-z] {a,b}",
        "leading dash": "-n",
        "leading double dash": "--help",
        "tilde": "~root",
        "variables": "$HOME ${IFS} $0 $$",
        "pdsh substitutions": "%n %h %u %%",
        "history": "!! !$",
        "redirections": f">{m}7 <{m}8 2>&1",
        "pipe and and": f"| touch {m}9 && touch {m}10 || touch {m}11",
        "process substitution": f"<(touch {m}12)",
        "comment": "#not a comment",
        "unicode": "naïve 名前 😀",
        "escape sequence": "\x1b[31mred\x1b[0m",
        "not UTF-8": os.fsdecode(b"\xff\xfe"),
        "empty": "",
        "long (40,000 characters)": "x" * 40_000,
    }


def verbatim(tmp: Path) -> int:
    values = hostile_values(tmp)
    # a path's name cannot hold '/': these markers are relative (to wherever a shell would run them)
    cwd = tmp / "cwd with space $(touch pwned20) 'q' ;x"
    cwd.mkdir()
    venv = tmp / "venv $(touch pwned21) ;`touch pwned22`"
    venv.mkdir()
    (venv / "activate").write_text("export DS_FACE_SOURCED=yes\n")
    env = {f"DS_FACE_V{i}": value for i, value in enumerate(values.values())}
    show = ("import json, os, sys; print('RECEIVED', json.dumps([os.getcwd(), sys.argv[1:], "
            "{k: v for k, v in os.environ.items() if k.startswith('DS_FACE_')}]))")
    argv = [sys.executable, "-c", show, *values.values()]
    out = tmp / "verbatim.out"
    with open(out, "wb") as f:  # run_on_hosts relays to this process's stdout: send it to a file
        saved = os.dup(1)
        os.dup2(f.fileno(), 1)
        try:
            rc = run_on_hosts({host: argv for host in HOSTS}, str(cwd), env, source=str(venv / "activate"))
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
    text = out.read_bytes().decode("utf-8", "surrogateescape")
    if rc != 0:
        fail(f"run_on_hosts exited {rc}:\n{text[-3000:]}")
    expected = [str(cwd), list(values.values()), {**env, "DS_FACE_SOURCED": "yes"}]
    got = {}
    for line in text.splitlines():
        host, _, rest = line.partition(": ")
        if rest.startswith("RECEIVED "):
            got[host] = json.loads(rest[len("RECEIVED "):])
    if sorted(got) != list(HOSTS):
        fail(f"expected one RECEIVED line from each host, got {sorted(got)}:\n{text[-3000:]}")
    for host, (cwd_got, args_got, env_got) in got.items():
        if cwd_got != expected[0]:
            fail(f"{host}: working directory {cwd_got!r}, sent {expected[0]!r}")
        for (name, value), arg, (key, sent) in zip(values.items(), args_got, env.items()):
            if arg != value or env_got.get(key) != sent:
                fail(f"{host}: {name}: sent {value[:60]!r}, argument {arg[:60]!r}, environment "
                     f"{str(env_got.get(key))[:60]!r}")
        if env_got != expected[2] or len(args_got) != len(values):
            fail(f"{host}: environment or argument count differs")
    markers = [str(p) for folder in (tmp, cwd, venv, Path.home(), Path.cwd()) for p in folder.glob("pwned*")]
    if markers:
        fail(f"marker files appeared: {markers}")
    for name, value in values.items():
        print(f"verbatim: {name}: {value[:40]!r} arrived verbatim on both hosts (argument, environment value)")
    print(f"verbatim: working directory {str(cwd)!r} and --venv_script {str(venv / 'activate')!r}: verbatim")
    return len(values) + 2


def guarded(tag: str) -> list[int]:
    """pids whose command line holds ``tag``: the nodes' guards and sleeps of one launch (both "hosts")."""
    import psutil
    return [p.info["pid"] for p in psutil.process_iter(["pid", "cmdline"])
            if p.info["pid"] != os.getpid() and tag in " ".join(p.info["cmdline"] or ())]


def kill_nine(tmp: Path) -> None:
    # each host runs `python -c "sleep" TAG`: TAG in the command lines of the node's guard and sleeper
    launcher = ("import sys; from ds_face.launch.multinode import run_on_hosts; "
                "argv = [sys.executable, '-c', 'import time; time.sleep(1000)', sys.argv[1]]; "
                "sys.exit(run_on_hosts({h: argv for h in ('127.0.0.1', '127.0.0.2')}, '/', {}))")
    runs = {}
    for name in ("first", "second"):
        tag = f"ds-face-transport-{name}-{os.getpid()}"
        runs[name] = (tag, subprocess.Popen([sys.executable, "-c", launcher, tag], stdout=subprocess.DEVNULL))
    deadline = time.monotonic() + 60
    while any(len(guarded(f"time.sleep(1000) {tag}")) < 4 for tag, _ in runs.values()):  # 2 guards, 2 sleeps
        if time.monotonic() > deadline:
            fail("the sleeps did not start on both hosts")
        time.sleep(0.2)
    tag, first = runs["first"]
    first.send_signal(signal.SIGKILL)
    first.wait()
    deadline = time.monotonic() + NODE_STOP_S + 15
    while guarded(tag):
        if time.monotonic() > deadline:
            fail(f"kill -9 of the launcher: its processes still run: {guarded(tag)}")
        time.sleep(0.2)
    tag2, second = runs["second"]
    if len(guarded(f"time.sleep(1000) {tag2}")) != 4 or second.poll() is not None:
        fail("the second launch's sleeps did not survive the first launcher's kill -9")
    second.send_signal(signal.SIGTERM)
    try:
        rc = second.wait(timeout=NODE_STOP_S + 15)
    except subprocess.TimeoutExpired:
        fail("SIGTERM did not stop the second launcher")
    if rc != 128 + signal.SIGTERM or guarded(tag2):
        fail(f"SIGTERM: the second launcher exited {rc}, left {guarded(tag2)}")
    print("kill -9: the first launcher's sleeps stopped on both hosts, the second's ran on until its SIGTERM")


def main():
    tmp = Path(sys.argv[1])
    count = verbatim(tmp)
    kill_nine(tmp)
    print(f"transport: OK: {count} hostile values verbatim on both hosts, no marker; kill -9 stops only its launch")


if __name__ == "__main__":
    main()
