"""Real faults for tests: a small private tmpfs that fills up, and system calls that fail on cue.

- PrivateTmpfs: a tmpfs of a given size mounted in a private mount namespace (`unshare -m`) that a holder
  process keeps alive. Commands run inside it through `nsenter`, and the test reads and writes its files through
  /proc/<holder>/root, so a daemon can be killed and started again on the same small disk.
- strace_prefix(): a command prefix that makes one system call fail from its Nth call on
  (`strace -f -e inject=SYSCALL:error=ERRNO:when=N+`), for every thread of the process.
Nothing here is a mock: the kernel really refuses the write or the fsync.
"""

import os
import subprocess
import tempfile

from tests.support import STARTUP_TIMEOUT, require_binary


class PrivateTmpfs:
    def __init__(self, size: str = "512k"):
        require_binary("unshare")
        require_binary("nsenter")
        self.size = size
        self.mountpoint = tempfile.mkdtemp(prefix="sseserver-tmpfs-")
        self.holder: subprocess.Popen | None = None

    def __enter__(self) -> "PrivateTmpfs":
        self.holder = subprocess.Popen(
            [
                "unshare",
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                f"mount -t tmpfs -o size={self.size},mode=0700 tmpfs {self.mountpoint}"
                " && echo mounted && exec sleep 3600",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        line = self.holder.stdout.readline()  # blocks until mounted or the holder died
        if line.strip() != b"mounted":
            self.holder.kill()
            raise AssertionError(f"could not mount a private tmpfs: {self.holder.stderr.read().decode()!r}")
        return self

    def prefix(self) -> list[str]:
        """Run a command inside the namespace, so it sees the tmpfs at `mountpoint`."""
        return ["nsenter", "-t", str(self.holder.pid), "-m", "-w", "--"]  # -w: keep the holder's directory

    def path(self, name: str) -> str:
        """Where the test itself reaches a file on the tmpfs (through the holder's view of the file system)."""
        return f"/proc/{self.holder.pid}/root{os.path.join(self.mountpoint, name)}"

    def inside(self, name: str) -> str:
        """The file's path as processes inside the namespace see it."""
        return os.path.join(self.mountpoint, name)

    def __exit__(self, *exc) -> None:
        self.holder.kill()
        self.holder.wait(STARTUP_TIMEOUT)
        self.holder.stdout.close()
        self.holder.stderr.close()
        os.rmdir(self.mountpoint)


def strace_prefix(syscall: str, errno_name: str, from_call: int, trace: str | None = None) -> list[str]:
    """Make `syscall` fail with `errno_name` from its `from_call`-th call on, in every thread. strace counts
    calls per thread (per tracee), not per process: the first fsync of each new thread is call 1."""
    require_binary("strace")
    return [
        "strace",
        "-f",
        "-qq",
        "-o",
        "/dev/null",
        "-e",
        f"trace={trace or syscall}",
        "-e",
        f"inject={syscall}:error={errno_name}:when={from_call}+",
    ]
