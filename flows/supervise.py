"""A long CLI command runs in a child process group that dies as one, however the command is stopped.

A build starts other processes: Prefect's temporary API server and the augment stage's process pool.
Killed the plain way they outlive it (the server is a plain `subprocess.Popen` that only an `atexit` hook
stops, and SIGTERM's default action skips `atexit`), and a SIGTERM that arrives while the main thread waits
on a pool is not acted on until the wait ends. So `supervise()` forks first thing: the child leads a
new process group and carries on with the command; the parent only waits. Then

- SIGTERM or SIGINT (Ctrl-C, `timeout`, Kubernetes, a Prefect worker) to the parent: the whole child group
  is killed at once, server and workers included;
- the parent killed with SIGKILL: a watchdog thread in the child, blocked on a pipe whose only writer
  is the parent, reads end-of-file and kills the child's group (a thread, not a signal handler: Prefect's
  flow engine installs its own SIGTERM handler, and a handler runs only when the main thread is free);
- the child killed, or finished: the parent kills what is left of its group and exits as the child did
  (same code, or the same signal).

Work is never lost by this: every file is written to a temporary name and renamed, stages resume from
their markers, the run lock is an OS lock released with the process, and temporary files left by a kill
are removed at the next run's start.
"""

from __future__ import annotations

import os
import signal
import sys
import threading


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def supervise() -> None:
    """Return in a child process (the command goes on there); the parent never returns.

    Set `KVQA_NO_SUPERVISOR=1` to run in-process (debuggers, profilers).
    """
    if os.environ.get("KVQA_NO_SUPERVISOR") == "1" or not hasattr(os, "fork"):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    parent_alive, parent_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.setpgid(0, 0)
        os.close(parent_end)

        def watch_parent() -> None:
            os.read(parent_alive, 1)  # returns b"" once the parent is gone, however it went
            _kill_group(0)

        threading.Thread(target=watch_parent, name="kvqa-parent-watchdog", daemon=True).start()
        return
    os.close(parent_alive)
    try:
        os.setpgid(pid, pid)  # also here, so the group exists before any signal is forwarded
    except (PermissionError, ProcessLookupError):
        pass  # the child already did it (or has exec'd / exited)
    received: list[int] = []

    def stop(sig: int, _frame) -> None:
        received.append(sig)
        _kill_group(pid)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    _, status = os.waitpid(pid, 0)
    _kill_group(pid)  # whatever the child left running: the temporary server, pool workers
    if received or os.WIFSIGNALED(status):  # end the way the command was ended
        sig = received[0] if received else os.WTERMSIG(status)
        if sig != signal.SIGKILL:  # SIGKILL has no handler to reset
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    os._exit(os.waitstatus_to_exitcode(status))
