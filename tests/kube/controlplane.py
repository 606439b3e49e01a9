"""A real Kubernetes control plane on loopback for the cluster tests: etcd, kube-apiserver,
kube-controller-manager and kube-scheduler, started as processes and stopped by their PIDs.

    bindir = build()                                  # tests/kube/go/build.sh: once per machine, cached
    with ControlPlane(bindir, tmp_path) as plane:     # ready in a few seconds
        plane.kubeconfig                              # admin (system:masters) over HTTPS, a static token
        plane.kubectl("get", "nodes")

Everything listens on free loopback ports. The API server generates its own self-signed serving
certificate (clients skip verification: it is this machine's own server), signs service-account tokens
with a key made here by openssl, authorises by RBAC, and admits with its default plug-ins (so a pod
whose ServiceAccount does not exist is refused, as on a real cluster). The controller manager runs every
default controller (Job, garbage collector, TTL, node lifecycle, pod GC...) without leader election.
No node runs here: tests/kube/kubelet.py registers one and runs its pods as processes.

The version is pinned in tests/kube/go/go.mod (K8S_VERSION below is read from it).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from critbatch.jobs.train.parent import preexec

GO_MODULE = Path(__file__).parent / "go"
BUILD_SCRIPT = GO_MODULE / "build.sh"
K8S_VERSION = re.search(r"^\s*k8s\.io/kubernetes (v[0-9.]+)", (GO_MODULE / "go.mod").read_text(), re.M).group(1)
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
#: Where a prebuilt set may be named instead of building (a folder holding BINARIES).
BIN_ENV = "CRITBATCH_K8S_BIN"
HOW_TO_GET = (f"the cluster tests need Kubernetes {K8S_VERSION}'s control plane: run `bash {BUILD_SCRIPT}` (Go 1.26 "
              "and the Go module proxy; about 10-15 minutes once per machine), or point CRITBATCH_K8S_BIN at a "
              f"folder holding {', '.join(BINARIES)}")


class ControlPlaneUnavailable(RuntimeError):
    """The binaries are missing and cannot be built here, or the control plane did not come up."""


def build() -> Path:
    """The folder holding the control plane's binaries: CRITBATCH_K8S_BIN, else the build script's cache
    (building it first when it is not there)."""
    if os.environ.get(BIN_ENV):
        folder = Path(os.environ[BIN_ENV])
        missing = [b for b in BINARIES if not (folder / b).is_file()]
        if missing:
            raise ControlPlaneUnavailable(f"{BIN_ENV}={folder} lacks {', '.join(missing)}; {HOW_TO_GET}")
        return folder
    if shutil.which("go") is None:
        raise ControlPlaneUnavailable(f"no `go` on PATH; {HOW_TO_GET}")
    done = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True)
    if done.returncode != 0:
        raise ControlPlaneUnavailable(f"{BUILD_SCRIPT} failed ({done.returncode}): {done.stderr.strip()[-2000:]}; "
                                      f"{HOW_TO_GET}")
    return Path(done.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler under ``workdir``."""

    def __init__(self, bindir: Path, workdir: Path, *, controllers: str = "*"):
        self.bindir = Path(bindir)
        self.workdir = Path(workdir)
        self.controllers = controllers
        self.procs: dict[str, subprocess.Popen] = {}
        self.port = 0
        self.token = secrets.token_hex(16)
        self.kubeconfig = self.workdir / "admin.kubeconfig"

    # ---- life cycle ------------------------------------------------------------------------------------

    def __enter__(self) -> "ControlPlane":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 120.0) -> None:
        started = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        pki = self.workdir / "pki"
        pki.mkdir(exist_ok=True)
        key, pub = pki / "sa.key", pki / "sa.pub"
        subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True)
        subprocess.run(["openssl", "rsa", "-in", str(key), "-pubout", "-out", str(pub)], check=True,
                       capture_output=True)
        tokens = pki / "tokens.csv"
        tokens.write_text(f'{self.token},critbatch-admin,critbatch-admin,"system:masters"\n')

        etcd_port, peer_port = free_port(), free_port()
        self._spawn("etcd", [f"--data-dir={self.workdir / 'etcd'}",
                             f"--listen-client-url=http://127.0.0.1:{etcd_port}",
                             f"--listen-peer-url=http://127.0.0.1:{peer_port}"])
        self._wait_for_log("etcd", "etcd ready", started + timeout)

        self.port = free_port()
        self._spawn("kube-apiserver", [
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={self.port}",
            f"--cert-dir={pki / 'serving'}",
            f"--token-auth-file={tokens}",
            "--authorization-mode=Node,RBAC",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pub}", f"--service-account-signing-key-file={key}",
            "--service-cluster-ip-range=10.96.0.0/24",
            "--allow-privileged=false", "--profiling=false",
            "--event-ttl=30m",
            # The advertise address is loopback, which the kubernetes Service's endpoints may not hold.
            "--endpoint-reconciler-type=none",
        ])
        self._write_kubeconfig()
        self._wait_ready(started + timeout)

        self._spawn("kube-controller-manager", [
            f"--kubeconfig={self.kubeconfig}",
            f"--authentication-kubeconfig={self.kubeconfig}", f"--authorization-kubeconfig={self.kubeconfig}",
            "--leader-elect=false", "--bind-address=127.0.0.1", f"--secure-port={free_port()}",
            f"--cert-dir={pki / 'kcm'}",
            f"--service-account-private-key-file={key}",
            f"--controllers={self.controllers}",
            "--profiling=false",
        ])
        self._spawn("kube-scheduler", [
            f"--kubeconfig={self.kubeconfig}",
            f"--authentication-kubeconfig={self.kubeconfig}", f"--authorization-kubeconfig={self.kubeconfig}",
            "--leader-elect=false", "--bind-address=127.0.0.1", f"--secure-port={free_port()}",
            f"--cert-dir={pki / 'scheduler'}", "--profiling=false",
        ])
        # The controllers are up once the service-account controller has made the default namespace's account.
        deadline = started + timeout
        while self.kubectl("get", "serviceaccount", "default", "-n", "default", check=False).returncode != 0:
            self._check_alive()
            if time.monotonic() > deadline:
                raise ControlPlaneUnavailable(f"no default ServiceAccount after {timeout:.0f} s\n{self.logs()}")
            time.sleep(0.2)
        self.ready_seconds = time.monotonic() - started

    def stop(self) -> None:
        """SIGTERM every process by its PID (last started first), SIGKILL what is left after 10 s."""
        for name, proc in reversed(list(self.procs.items())):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in reversed(list(self.procs.items())):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    # ---- helpers ---------------------------------------------------------------------------------------

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The environment that points kubectl and the kubernetes client at this control plane."""
        return {"KUBECONFIG": str(self.kubeconfig)}

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 120) -> subprocess.CompletedProcess:
        done = subprocess.run([str(self.bindir / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
                              input=input, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} exited {done.returncode}:\n{done.stderr}{done.stdout}")
        return done

    def logs(self, tail: int = 40) -> str:
        out = []
        for name in self.procs:
            lines = (self.workdir / f"{name}.log").read_text(errors="replace").splitlines()[-tail:]
            out.append(f"--- {name} ---\n" + "\n".join(lines))
        return "\n".join(out)

    def _spawn(self, name: str, args: list[str]) -> None:
        with open(self.workdir / f"{name}.log", "wb") as log:
            # Each dies with the test process however it ends (PR_SET_PDEATHSIG), so none outlives a killed run.
            self.procs[name] = subprocess.Popen([str(self.bindir / name), *args], stdout=log,
                                                stderr=subprocess.STDOUT, start_new_session=True,
                                                preexec_fn=preexec(signal.SIGTERM))

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise ControlPlaneUnavailable(f"{name} exited {proc.returncode}\n{self.logs()}")

    def _wait_for_log(self, name: str, text: str, deadline: float) -> None:
        log = self.workdir / f"{name}.log"
        while text not in log.read_text(errors="replace"):
            self._check_alive()
            if time.monotonic() > deadline:
                raise ControlPlaneUnavailable(f"{name}: no {text!r} in time\n{self.logs()}")
            time.sleep(0.1)

    def _wait_ready(self, deadline: float) -> None:
        while self.kubectl("get", "--raw=/readyz", check=False, timeout=10).returncode != 0:
            self._check_alive()
            if time.monotonic() > deadline:
                raise ControlPlaneUnavailable(f"kube-apiserver not ready in time\n{self.logs()}")
            time.sleep(0.2)

    def _write_kubeconfig(self) -> None:
        self.kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters:\n- name: critbatch-test\n  cluster:\n    server: {self.server}\n"
            "    insecure-skip-tls-verify: true\n"
            f"users:\n- name: critbatch-admin\n  user:\n    token: {self.token}\n"
            "contexts:\n- name: critbatch-test\n  context:\n    cluster: critbatch-test\n    user: critbatch-admin\n"
            "current-context: critbatch-test\n")
