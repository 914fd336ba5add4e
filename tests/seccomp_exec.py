"""Run a command under the system call allow-list a unit's ``SystemCallFilter=`` gives it.

``python tests/seccomp_exec.py [--action kill|eperm] SET... -- COMMAND [ARG...]``

``SET``: a systemd group (``@system-service``) or a call name, expanded with
``systemd-analyze syscall-filter``: the tables systemd itself applies. As with
``SystemCallArchitectures=native``, only the native ABI is allowed (libseccomp's default:
a call through another ABI kills the process). ``--action kill`` (the default) makes any call
outside the set fatal (SIGSYS), so a run that ends normally made none; ``eperm`` is what a
unit with ``SystemCallErrorNumber=EPERM`` does. No systemd needs to be running: this loads
the filter with libseccomp (a dependency of the systemd package) and execs the command.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import re
import subprocess
import sys
from collections.abc import Iterable

SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_ERRNO = 0x00050000
LIBSECCOMP = "libseccomp.so.2"


def syscall_groups(analyze: str = "systemd-analyze") -> dict[str, list[str]]:
    """Every group systemd knows: ``{"@system-service": ["@aio", ..., "capget", ...]}``."""
    out = subprocess.run([analyze, "syscall-filter"], capture_output=True, text=True,
                         check=True).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in out.splitlines():
        if re.match(r"^@[\w-]+$", line):
            current = groups.setdefault(line, [])
        elif current is not None and line.startswith(" ") and line.strip() \
                and not line.strip().startswith("#"):
            current.append(line.strip())
    return groups


def expand(names: Iterable[str], groups: dict[str, list[str]]) -> set[str]:
    """The call names ``names`` stand for (groups expanded recursively)."""
    calls: set[str] = set()
    pending, seen = list(names), set()
    while pending:
        name = pending.pop()
        if not name.startswith("@"):
            calls.add(name)
        elif name not in seen:
            if name not in groups:
                raise SystemExit(f"seccomp_exec: unknown system call group {name}")
            seen.add(name)
            pending += groups[name]
    return calls


def load_filter(calls: Iterable[str], default_action: int) -> int:
    """Install the allow-list on this process (and what it execs); returns how many calls
    this architecture has of ``calls`` (the others do not exist here)."""
    try:
        lib = ctypes.CDLL(LIBSECCOMP, use_errno=True)
    except OSError as exc:
        raise SystemExit(f"seccomp_exec: {LIBSECCOMP} is missing ({exc}): install the Debian "
                         "package libseccomp2 (scripts/bootstrap.sh installs systemd, which "
                         "depends on it)") from None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                     ctypes.c_uint]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(default_action)
    if not ctx:
        raise SystemExit("seccomp_exec: seccomp_init failed")
    allowed = 0
    for name in sorted(calls):
        number = lib.seccomp_syscall_resolve_name(name.encode())
        if number < 0:  # not a call of this architecture (e.g. arm_fadvise64_64 on x86-64)
            continue
        rc = lib.seccomp_rule_add(ctx, SCMP_ACT_ALLOW, number, 0)
        if rc != 0:
            raise SystemExit(f"seccomp_exec: cannot allow {name}: {os.strerror(-rc)}")
        allowed += 1
    rc = lib.seccomp_load(ctx)  # also sets no_new_privs, as NoNewPrivileges=yes does
    if rc != 0:
        raise SystemExit(f"seccomp_exec: seccomp_load failed: {os.strerror(-rc)}")
    return allowed


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        raise SystemExit(__doc__)
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="seccomp_exec")
    parser.add_argument("--action", choices=["kill", "eperm"], default="kill")
    parser.add_argument("--analyze", default="systemd-analyze")
    parser.add_argument("sets", nargs="+")
    ns = parser.parse_args(argv[:split])
    command = argv[split + 1:]
    calls = expand(ns.sets, syscall_groups(ns.analyze))
    action = SCMP_ACT_KILL_PROCESS if ns.action == "kill" else SCMP_ACT_ERRNO | errno.EPERM
    allowed = load_filter(calls, action)
    print(f"seccomp_exec: {allowed} system calls allowed ({' '.join(ns.sets)}), "
          f"others: {ns.action}", file=sys.stderr, flush=True)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
