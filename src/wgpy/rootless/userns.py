"""User, network and mount namespaces through libc (os.unshare arrives only in 3.12).

`check()` answers, before anything is made, whether this process may make them: a forked
child tries, so the caller's own state is untouched. `enter()` makes them for the calling
process (which must still be single-threaded), maps the caller's uid and gid, and makes
the mount tree private so that `bind_resolv_conf` changes nothing outside.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import tempfile

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000

# The knobs that decide whether an ordinary user may make a user namespace, by kernel.
USERNS_SYSCTLS = (
    ("user.max_user_namespaces", "must be above 0"),
    ("kernel.unprivileged_userns_clone", "must be 1 (Debian, Ubuntu kernels)"),
    ("kernel.apparmor_restrict_unprivileged_userns", "must be 0 (Ubuntu 23.10 and later)"),
)


class NamespaceError(Exception):
    """The namespaces cannot be made here; the message says why and what decides it."""


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    _check(_libc().unshare(flags), "unshare")


def mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    def c(s: str | None) -> bytes | None:
        return None if s is None else os.fsencode(s)

    _check(_libc().mount(c(source), c(target), c(fstype), flags, None), f"mount {target}")


def flags_for(euid: int) -> int:
    """Root needs no user namespace (and is not stopped by user.max_user_namespaces=0)."""
    return CLONE_NEWNET | CLONE_NEWNS | (0 if euid == 0 else CLONE_NEWUSER)


def sysctl_report() -> str:
    """The user-namespace sysctls this kernel has, with their values."""
    found = []
    for name, want in USERNS_SYSCTLS:
        path = "/proc/sys/" + name.replace(".", "/")
        try:
            with open(path) as f:
                value = f.read().strip()
        except OSError:
            continue
        found.append(f"{name} = {value} ({want})")
    return "; ".join(found) or "no user-namespace sysctl found on this kernel"


def check(flags: int | None = None) -> None:
    """Raise NamespaceError if this process could not unshare `flags`; changes nothing."""
    flags = flags_for(os.geteuid()) if flags is None else flags
    if not os.path.exists("/dev/net/tun"):
        raise NamespaceError("/dev/net/tun does not exist: this kernel has no TUN device here")
    pid = os.fork()
    if pid == 0:  # the child only tries, and reports the errno as its exit status
        code = 0
        try:
            unshare(flags)
        except OSError as e:
            code = min(e.errno or 1, 255)
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 0:
        return
    reason = os.strerror(code) if code > 0 else f"signal {-code}"
    if flags & CLONE_NEWUSER:
        raise NamespaceError(
            f"this system does not let an unprivileged user create a user namespace "
            f"(unshare: {reason}); the settings that decide it: {sysctl_report()}"
        )
    raise NamespaceError(f"cannot create a network namespace (unshare: {reason})")


def enter(flags: int) -> None:
    """Unshare, map our uid/gid to themselves (in a user namespace), make mounts private."""
    uid, gid = os.geteuid(), os.getegid()
    unshare(flags)
    if flags & CLONE_NEWUSER:
        with contextlib.suppress(FileNotFoundError):  # kernels before 3.19 have no file
            _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
    if flags & CLONE_NEWNS:
        mount(None, "/", None, MS_REC | MS_PRIVATE)


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def resolv_conf_text(servers: list[str], search: list[str]) -> str:
    lines = [f"nameserver {s}" for s in servers]
    if search:
        lines.append("search " + " ".join(search))
    return "\n".join(lines) + "\n"


def bind_resolv_conf(text: str, target: str = "/etc/resolv.conf") -> None:
    """Put `text` over /etc/resolv.conf, in our (private) mount namespace only. The file
    behind the mount is unlinked at once: nothing remains once the namespace is gone."""
    real = os.path.realpath(target)
    if not os.path.exists(real):
        raise OSError(errno.ENOENT, f"{target} (-> {real}) does not exist to mount over")
    fd, path = tempfile.mkstemp(prefix="wgpy-resolv-", suffix=".conf")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(path, 0o644)
        mount(path, real, None, MS_BIND)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
