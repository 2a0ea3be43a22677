"""Two "hosts" on one Linux machine: network namespaces joined by a veth pair, for multi-node tests.

    with VirtualHosts(2) as hosts:          # needs root and iproute2 (`ip netns`)
        p0 = hosts.popen(0, ["bash", "launchers/torchrun.sh", ...], env=..., log=...)
        hosts.ip(0), hosts.hostname(0), hosts.ifname(0)   # 10.x.y.1, "host0", the veth end

Host i lives in the namespace ``da7-<pid>-<i>``, reaches the other through its end of a veth pair
(``ifname(i)``, address ``10.<a>.<b>.<i+1>/24``, private and only inside these namespaces) and has its
own loopback and hostname (``unshare --uts``, names ``host0``, ``host1``). ``ip netns exec`` mounts
``/etc/netns/<name>/hosts`` over ``/etc/hosts``, so the hostnames resolve to those addresses and a
reverse lookup answers at once (the machine's DNS server is unreachable from the namespaces; an
empty ``resolv.conf`` makes lookups fail fast instead of timing out).

Teardown (``close``, also on any error and from ``__exit__``) kills every process started through
``popen`` together with all its descendants (torchrun starts workers in new sessions, so a process
group is not enough), deletes the namespaces (which deletes the veth pair) and the
``/etc/netns/<name>`` files. Namespaces left by a killed earlier run (their pid is gone) are removed
on the next start.
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import time

PREFIX = "da7-"
NETNS_ETC = "/etc/netns"


class NetnsUnavailable(RuntimeError):
    pass


def _run(*cmd: str) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({res.returncode}): {res.stderr.strip()}")


def _namespaces() -> list[str]:
    res = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    return [line.split()[0] for line in res.stdout.splitlines() if line.strip()]


def _delete_namespace(name: str) -> None:
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
    shutil.rmtree(os.path.join(NETNS_ETC, name), ignore_errors=True)


def remove_stale() -> None:
    """Delete namespaces of this module whose creating process is gone."""
    names = set(_namespaces()) | {os.path.basename(p) for p in glob.glob(os.path.join(NETNS_ETC, PREFIX + "*"))}
    for name in names:
        if not name.startswith(PREFIX):
            continue
        try:
            pid = int(name.split("-")[1])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not os.path.exists(f"/proc/{pid}"):
            _delete_namespace(name)


def kill_tree(pid: int, grace_s: float = 5.0) -> None:
    """SIGTERM ``pid`` and all its descendants, then SIGKILL whatever is left after ``grace_s``."""
    import psutil
    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace_s)


class VirtualHosts:
    """``n`` = 2 namespaces ("hosts") joined by a veth pair; see the module docstring."""

    def __init__(self, n: int = 2):
        if n != 2:
            raise ValueError(f"VirtualHosts: expected n=2 (one veth pair), got {n}")
        self.n = n
        pid = os.getpid()
        self.names = [f"{PREFIX}{pid}-{i}" for i in range(n)]
        tag = pid % 100000
        self.ifnames = [f"da7v{tag}{'ab'[i]}" for i in range(n)]  # <= 15 characters
        a, b = 100 + (pid >> 8) % 100, pid % 256  # 10.a.b.0/24: private, only inside our namespaces
        self.ips = [f"10.{a}.{b}.{i + 1}" for i in range(n)]
        self.hostnames = [f"host{i}" for i in range(n)]
        self.procs: list[subprocess.Popen] = []
        self._logs: list = []
        self._up = False

    def ip(self, i: int) -> str:
        return self.ips[i]

    def hostname(self, i: int) -> str:
        return self.hostnames[i]

    def ifname(self, i: int) -> str:
        return self.ifnames[i]

    # ------------------------------------------------------------------ setup / teardown
    def start(self) -> "VirtualHosts":
        if os.geteuid() != 0:
            raise NetnsUnavailable(f"multi-node tests create network namespaces and need root, got uid "
                                   f"{os.geteuid()}. Fix: run the tests as root (CI containers are).")
        for tool in ("ip", "unshare"):
            if shutil.which(tool) is None:
                raise NetnsUnavailable(f"multi-node tests need `{tool}`, not found on PATH. Fix: "
                                       f"apt-get install -y iproute2 util-linux")
        remove_stale()
        try:
            for name in self.names:
                _run("ip", "netns", "add", name)
            _run("ip", "link", "add", self.ifnames[0], "netns", self.names[0], "type", "veth",
                 "peer", "name", self.ifnames[1], "netns", self.names[1])
            hosts = "127.0.0.1 localhost\n" + "".join(f"{ip} {h}\n" for ip, h in zip(self.ips, self.hostnames))
            for name, ifname, ip in zip(self.names, self.ifnames, self.ips):
                _run("ip", "-n", name, "addr", "add", f"{ip}/24", "dev", ifname)
                _run("ip", "-n", name, "link", "set", ifname, "up")
                _run("ip", "-n", name, "link", "set", "lo", "up")
                etc = os.path.join(NETNS_ETC, name)
                os.makedirs(etc, exist_ok=True)
                with open(os.path.join(etc, "hosts"), "w") as f:
                    f.write(hosts)
                with open(os.path.join(etc, "resolv.conf"), "w") as f:
                    f.write("# no DNS inside the test namespaces: /etc/hosts only\n")
            self._up = True
            self._wait_link()
        except BaseException as e:
            self.close()
            if isinstance(e, RuntimeError) and not isinstance(e, NetnsUnavailable):
                raise NetnsUnavailable(f"could not create the test network namespaces: {e}. Fix: run as root "
                                       f"on a kernel with network namespaces and veth (ip netns add works)") from e
            raise
        return self

    def _wait_link(self, timeout_s: float = 10.0) -> None:
        """Until host1 can open a TCP connection to host0 (the veth may take a moment to come up)."""
        probe = ("import socket, sys, time\n"
                 "s = socket.socket(); s.bind((sys.argv[1], 0)); s.listen(1)\n"
                 "print(s.getsockname()[1], flush=True); s.settimeout(float(sys.argv[2])); s.accept()\n")
        server = subprocess.Popen(["ip", "netns", "exec", self.names[0], "python3", "-c", probe, self.ips[0],
                                   str(timeout_s)], stdout=subprocess.PIPE, text=True)
        try:
            port = server.stdout.readline().strip()
            client = ("import socket, sys, time\n"
                      "end = time.monotonic() + float(sys.argv[3])\n"
                      "while True:\n"
                      "    try:\n"
                      "        socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close(); break\n"
                      "    except OSError:\n"
                      "        if time.monotonic() > end: raise\n"
                      "        time.sleep(0.1)\n")
            _run("ip", "netns", "exec", self.names[1], "python3", "-c", client, self.ips[0], port, str(timeout_s))
        finally:
            server.kill()
            server.wait()

    def close(self) -> None:
        for p in self.procs:
            kill_tree(p.pid)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.procs.clear()
        for f in self._logs:
            f.close()
        self._logs.clear()
        for name in self.names:
            _delete_namespace(name)
        try:
            os.rmdir(NETNS_ETC)  # only if empty: other namespaces' files stay
        except OSError:
            pass
        self._up = False

    def __enter__(self) -> "VirtualHosts":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ processes
    def command(self, i: int, argv: list[str]) -> list[str]:
        """``argv`` as run on host ``i``: inside its namespace, with its own hostname."""
        return ["ip", "netns", "exec", self.names[i], "unshare", "--uts", "sh", "-c",
                'hostname "$0" && exec "$@"', self.hostnames[i], *argv]

    def popen(self, i: int, argv: list[str], *, env: dict | None = None, cwd: str | None = None,
              log: str | None = None) -> subprocess.Popen:
        """Start ``argv`` on host ``i`` (output to the file ``log``, else discarded); ``close`` kills it."""
        if not self._up:
            raise RuntimeError("VirtualHosts.popen: the hosts are not up (use `with VirtualHosts() as hosts:`)")
        out = open(log, "w") if log else subprocess.DEVNULL
        if log:
            self._logs.append(out)
        p = subprocess.Popen(self.command(i, argv), env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True)
        self.procs.append(p)
        return p


@contextlib.contextmanager
def teardown_on_sigterm():
    """While active, SIGTERM (a CI job's timeout, ``timeout(1)``) raises KeyboardInterrupt in the main
    thread: pytest then stops *and runs the fixture finalizers*, which it skips when SIGTERM kills it."""
    def _interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}: stopping, tearing the test hosts down")
    old = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def wait_all(procs: list[subprocess.Popen], timeout_s: float) -> list[int]:
    """Exit codes of ``procs``; raises TimeoutError (naming the ones still running) after ``timeout_s``."""
    end = time.monotonic() + timeout_s
    while any(p.poll() is None for p in procs):
        if time.monotonic() > end:
            running = [i for i, p in enumerate(procs) if p.poll() is None]
            raise TimeoutError(f"processes {running} still running after {timeout_s:.0f} s (hang?)")
        time.sleep(0.1)
    return [p.returncode for p in procs]
