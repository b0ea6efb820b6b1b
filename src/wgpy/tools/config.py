"""wg-quick configuration files: parse and check, turn into UAPI, strip, render.

The format is wg-quick's: `[Interface]` and `[Peer]` sections of `Key = Value` lines,
keys in any case, `#` comments. wg-quick's own keys (Address, DNS, MTU, Table, hooks,
SaveConfig) and the `wg setconf` keys are both understood and checked here, so that a
mistake is reported with its file, line and key before anything on the system changes.
Endpoint names are resolved when the UAPI request is made (`to_uapi`), as `wg` resolves
them: temporary failures retried with a growing pause, permanent ones at once; a name
that does not resolve is reported with its file and line too.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from wgpy.core.crypto import decode_key, encode_key, hide_keys
from wgpy.core.endpoint import format_endpoint, split_endpoint
from wgpy.tools.uapi_client import DeviceStatus

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
CONFIG_DIR = "/etc/wireguard"
_NAME = re.compile(r"[a-zA-Z0-9_=+.-]{1,15}")
QUICK_KEYS = ("address", "dns", "mtu", "table", "preup", "postup", "predown", "postdown",
              "saveconfig")  # fmt: skip


class ConfigError(Exception):
    """`path:line: key: message`. What the file said is quoted only through `hide_keys`:
    a bad line may hold a private key (one that lost its "=", or went in the wrong field)."""

    def __init__(self, path: str, line: int, key: str, message: str) -> None:
        said = f"{key}: {message}" if key else message
        super().__init__(f"{path}:{line}: {hide_keys(said)}")


class ResolveError(ValueError):
    """An endpoint's host name that does not resolve."""


# Keys are kept out of repr (and so of str and format): `log.debug("%s", cfg)` in an
# application must not log them. `render` (Config.text()) writes them, as it must.
@dataclass
class InterfaceConfig:
    private_key: bytes | None = field(default=None, repr=False)
    listen_port: int | None = None
    fwmark: int | None = None
    addresses: list[IPInterface] = field(default_factory=list)
    dns: list[str] = field(default_factory=list)
    dns_search: list[str] = field(default_factory=list)
    mtu: int | None = None
    table: str | None = None
    pre_up: list[str] = field(default_factory=list)
    post_up: list[str] = field(default_factory=list)
    pre_down: list[str] = field(default_factory=list)
    post_down: list[str] = field(default_factory=list)
    save_config: bool = False


@dataclass
class PeerConfig:
    public_key: bytes
    preshared_key: bytes | None = field(default=None, repr=False)
    allowed_ips: list[IPNetwork] = field(default_factory=list)
    endpoint: str | None = None
    persistent_keepalive: int | None = None
    endpoint_line: int = field(default=0, compare=False, repr=False)  # for errors

    @classmethod
    def build(
        cls,
        public_key: str | bytes,
        *,
        allowed_ips: Iterable[str] = (),
        endpoint: str | None = None,
        preshared_key: str | bytes | None = None,
        persistent_keepalive: int | None = None,
    ) -> PeerConfig:
        """A [Peer] section from plain values (keys in base64 or raw bytes)."""
        if endpoint is not None:
            split_endpoint(endpoint)
        return cls(
            _key_value(public_key),
            _key_value(preshared_key) if preshared_key is not None else None,
            [ipaddress.ip_network(n, strict=False) for n in allowed_ips],
            endpoint,
            persistent_keepalive or None,
        )


@dataclass
class Config:
    interface: InterfaceConfig = field(default_factory=InterfaceConfig)
    peers: list[PeerConfig] = field(default_factory=list)
    path: str = field(default="<config>", compare=False, repr=False)  # for errors

    @classmethod
    def from_text(cls, text: str, path: str = "<config>") -> Config:
        return parse(text, path)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Config:
        name = os.fspath(path)
        try:
            with open(name) as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(name, 0, "file", str(e)) from None
        return parse(text, name)

    @classmethod
    def build(
        cls,
        private_key: str | bytes,
        *,
        address: Iterable[str] = (),
        listen_port: int | None = None,
        dns: Iterable[str] = (),
        mtu: int | None = None,
        peers: Iterable[PeerConfig] = (),
    ) -> Config:
        """An [Interface] section and its peers from plain values."""
        iface = InterfaceConfig(private_key=_key_value(private_key), listen_port=listen_port,
                                mtu=mtu)  # fmt: skip
        iface.addresses = [ipaddress.ip_interface(a) for a in address]
        for value in dns:
            _set_interface(iface, "dns", value)
        return cls(iface, list(peers))

    def text(self) -> str:
        """The wg-quick file for this config."""
        return render(self)


def _key_value(key: str | bytes) -> bytes:
    return decode_key(key) if isinstance(key, str) else bytes(key)


# ---- values -------------------------------------------------------------------------------


def _number(value: str, low: int, high: int) -> int:
    if not re.fullmatch(r"[0-9]+", value) or not low <= int(value) <= high:
        raise ValueError(f"{value!r} is not a number from {low} to {high}")
    return int(value)


def _off_or_number(value: str, high: int) -> int:
    return 0 if value.lower() == "off" else _number(value, 0, high)


def _fwmark(value: str) -> int:
    if value.lower() == "off":
        return 0
    try:
        mark = int(value, 0)
    except ValueError:
        raise ValueError(f"{value!r} is not a mark") from None
    if not 0 <= mark < 1 << 32:
        raise ValueError(f"{value!r} is out of range")
    return mark


def _bool(value: str) -> bool:
    if value.lower() in ("true", "yes", "on", "1"):
        return True
    if value.lower() in ("false", "no", "off", "0"):
        return False
    raise ValueError(f"{value!r} is neither true nor false")


def _list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _table(value: str) -> str:
    if value.lower() in ("off", "auto"):
        return value.lower()
    if re.fullmatch(r"[0-9]+", value) and int(value) < 1 << 32:  # a u32, as the kernel's
        return str(int(value))
    raise ValueError(f"{value!r}: expected off, auto or a table number from 0 to {(1 << 32) - 1}")


# ---- parsing ------------------------------------------------------------------------------


def _set_interface(iface: InterfaceConfig, key: str, value: str) -> None:
    if key == "privatekey":
        iface.private_key = decode_key(value)
    elif key == "listenport":
        iface.listen_port = _number(value, 0, 65535)
    elif key == "fwmark":
        iface.fwmark = _fwmark(value)
    elif key == "address":
        iface.addresses += [ipaddress.ip_interface(v) for v in _list(value)]
    elif key == "dns":
        for v in _list(value):
            try:
                iface.dns.append(str(ipaddress.ip_address(v)))
            except ValueError:
                iface.dns_search.append(v)
    elif key == "mtu":
        iface.mtu = _number(value, 576, 65535)
    elif key == "table":
        iface.table = _table(value)
    elif key in ("preup", "postup", "predown", "postdown"):
        hooks: list[str] = getattr(iface, _HOOKS[key])
        hooks.append(value)
    elif key == "saveconfig":
        iface.save_config = _bool(value)
    else:
        raise KeyError(key)


_HOOKS = {"preup": "pre_up", "postup": "post_up", "predown": "pre_down", "postdown": "post_down"}


def _set_peer(peer: PeerConfig, key: str, value: str) -> None:
    if key == "presharedkey":
        peer.preshared_key = decode_key(value)
    elif key == "allowedips":
        peer.allowed_ips += [ipaddress.ip_network(v, strict=False) for v in _list(value)]
    elif key == "endpoint":
        split_endpoint(value)
        peer.endpoint = value
    elif key == "persistentkeepalive":
        peer.persistent_keepalive = _off_or_number(value, 65535) or None  # 0 is off too
    else:
        raise KeyError(key)


def parse(text: str, path: str = "<config>") -> Config:
    """The whole file checked; ConfigError names the first bad line and key."""
    cfg = Config(path=path)
    section = ""
    seen_interface = False
    peer_line = 0
    keys: set[bytes] = set()
    for number, raw in enumerate(text.split("\n"), 1):  # lines as wg-quick reads them
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            section = line.lower()
            if section == "[interface]":
                if seen_interface:
                    raise ConfigError(path, number, line, "a second [Interface] section")
                seen_interface = True
            elif section == "[peer]":
                _finish_peer(cfg, path, peer_line, keys)
                cfg.peers.append(PeerConfig(b""))
                peer_line = number
            else:
                raise ConfigError(path, number, line, "unknown section")
            continue
        key, eq, value = (part.strip() for part in line.partition("="))
        if not eq:  # not quoted: the line may be a key that lost its "="
            raise ConfigError(path, number, "", "expected Key = Value")
        try:
            if section == "[interface]":
                _set_interface(cfg.interface, key.lower(), value)
            elif section == "[peer]":
                peer = cfg.peers[-1]
                if key.lower() == "publickey":
                    peer.public_key = decode_key(value)
                elif key.lower() == "endpoint":
                    _set_peer(peer, "endpoint", value)
                    peer.endpoint_line = number
                else:
                    _set_peer(peer, key.lower(), value)
            else:
                raise ConfigError(path, number, key, "outside any section")
        except KeyError:
            raise ConfigError(path, number, key, "unknown key") from None
        except ValueError as e:
            raise ConfigError(path, number, key, str(e) or "bad value") from None
    _finish_peer(cfg, path, peer_line, keys)
    return cfg


def _finish_peer(cfg: Config, path: str, line: int, keys: set[bytes]) -> None:
    if not cfg.peers:
        return
    key = cfg.peers[-1].public_key
    if not key:
        raise ConfigError(path, line, "[Peer]", "no PublicKey")
    if key in keys:
        raise ConfigError(path, line, "PublicKey", "the same peer twice")
    keys.add(key)


def resolve_target(target: str) -> tuple[str, str]:
    """(interface name, config path) of `wgpy up NAME` or `wgpy up PATH`, as wg-quick."""
    path = f"{CONFIG_DIR}/{target}.conf" if _NAME.fullmatch(target) else target
    base = os.path.basename(path)
    if not base.endswith(".conf") or not _NAME.fullmatch(base[:-5]):
        raise ConfigError(path, 0, "file name", "must be an interface name followed by .conf")
    if not os.path.exists(path):
        raise ConfigError(path, 0, "file", "does not exist")
    return base[:-5], os.path.realpath(path)


def read(path: str) -> str:
    """The file as text. Like wg-quick, any bytes may follow a `#`; elsewhere a byte that
    is not UTF-8 is an error on its line. (A comment's bad bytes read as U+FFFD.)"""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(path, 0, "file", e.strerror or str(e)) from None
    try:
        return data.decode()
    except UnicodeDecodeError:
        pass
    lines = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        code, hash_, comment = raw.partition(b"#")  # a "#" byte is never inside a character
        try:
            text = code.decode()
        except UnicodeDecodeError as e:
            bad = f"byte 0x{code[e.start]:02x} at column {e.start + 1} is not UTF-8"
            raise ConfigError(path, number, "file", bad) from None
        lines.append(text + hash_.decode() + comment.decode("utf-8", "replace"))
    return "\n".join(lines)


def load(target: str) -> tuple[str, str, Config]:
    ifname, path = resolve_target(target)
    return ifname, path, parse(read(path), path)


def permission_warning(path: str) -> str | None:
    """wg-quick's warning when others may read the file (file and folder both open)."""
    mode = os.stat(path).st_mode & os.stat(os.path.dirname(path) or ".").st_mode
    return f"Warning: `{path}' is world accessible" if mode & stat.S_IRWXO else None


# ---- output ------------------------------------------------------------------------------


RETRIES_VARIABLE = "WG_ENDPOINT_RESOLUTION_RETRIES"
DEFAULT_RETRIES = 15  # wg's: 16 tries in all, about 70 s of pauses
# getaddrinfo's permanent failures (glibc's NameResolver notes): not worth another try
_PERMANENT = {
    getattr(socket, name)
    for name in ("EAI_NONAME", "EAI_FAIL", "EAI_NODATA")
    if hasattr(socket, name)
}


def resolution_retries(environ: dict[str, str] | None = None) -> int:
    """WG_ENDPOINT_RESOLUTION_RETRIES as `wg` reads it: a count, or -1 for `infinity`."""
    value = (os.environ if environ is None else environ).get(RETRIES_VARIABLE)
    if value is None:
        return DEFAULT_RETRIES
    if value == "infinity":
        return -1
    if not re.fullmatch(r"[0-9]+", value) or int(value) > 2**31 - 1:
        raise ResolveError(f"cannot parse {RETRIES_VARIABLE}: `{value}'")
    return int(value)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def resolve_endpoint(
    value: str,
    retries: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
    say: Callable[[str], None] = _say,
) -> str:
    """`host:port` with the host resolved, as `wg` does it: a temporary failure is tried
    again `retries` times (default: WG_ENDPOINT_RESOLUTION_RETRIES, else 15), after 1 s,
    then 1.2 times longer each time up to 20 s; a permanent one fails at once. Names
    under `.invalid` fail without a query (RFC 6761: they never resolve)."""
    host, port = split_endpoint(value)
    try:
        return format_endpoint((str(ipaddress.ip_address(host)), port))
    except ValueError:
        pass
    if host.lower().rstrip(".").rsplit(".", 1)[-1] == "invalid":
        raise ResolveError(f"cannot resolve `{host}': the .invalid domain never resolves")
    left = resolution_retries() if retries is None else retries
    pause = 1.0
    while True:
        try:
            info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM, proto=socket.IPPROTO_UDP)
            break
        except UnicodeError as e:  # not even a valid name (an empty label...)
            raise ResolveError(f"cannot resolve `{host}': {e}") from None
        except socket.gaierror as e:
            reason = e.strerror or str(e)
            if e.errno in _PERMANENT or left == 0:
                raise ResolveError(f"cannot resolve `{host}': {reason}") from None
            left -= left > 0
            say(f"{reason}: `{value}'. Trying again in {pause:.2f} seconds...")
            sleep(pause)
            pause = min(20.0, pause * 1.2)
    addr = ipaddress.ip_address(info[0][4][0])
    return format_endpoint((str(addr), port))


def to_uapi(cfg: Config, resolve: Callable[[str], str] = resolve_endpoint) -> str:
    """The `set=1` body that `wg setconf` would send (without `set=1` and the blank line).
    Endpoint names are resolved here; one that does not is a ConfigError on its line."""
    iface = cfg.interface
    lines = [f"private_key={(iface.private_key or bytes(32)).hex()}"]
    if iface.listen_port is not None:
        lines.append(f"listen_port={iface.listen_port}")
    if iface.fwmark is not None:
        lines.append(f"fwmark={iface.fwmark}")
    lines.append("replace_peers=true")
    for peer in cfg.peers:
        lines.append(f"public_key={peer.public_key.hex()}")
        lines.append(f"preshared_key={(peer.preshared_key or bytes(32)).hex()}")
        if peer.endpoint:
            try:
                endpoint = resolve(peer.endpoint)
            except (ValueError, OSError) as e:
                raise ConfigError(cfg.path, peer.endpoint_line, "Endpoint", str(e)) from None
            lines.append(f"endpoint={endpoint}")
        if peer.persistent_keepalive is not None:
            lines.append(f"persistent_keepalive_interval={peer.persistent_keepalive}")
        lines.append("replace_allowed_ips=true")
        lines += [f"allowed_ip={net}" for net in peer.allowed_ips]
    return "\n".join(lines) + "\n"


def strip(text: str) -> str:
    """`wg-quick strip`: the file without wg-quick's [Interface] keys, comments kept."""
    kept = []
    in_interface = False
    # lines end at \n only, as `parse` and wg-quick read them (str.splitlines would also
    # split at \r, \v, \x85, ... and turn a comment's tail into a live line)
    for raw in text.removesuffix("\n").split("\n"):
        line = raw.strip()
        key = line.split("#", 1)[0].split("=", 1)[0].strip().lower()
        if key.startswith("["):
            in_interface = key == "[interface]"
        if in_interface and key in QUICK_KEYS:
            continue
        kept.append(line)
    return "\n".join(kept) + "\n\n"


def from_status(dev: DeviceStatus, quick: InterfaceConfig) -> Config:
    """A running device (from the UAPI) as a config, with the given wg-quick keys."""
    iface = InterfaceConfig(**{**quick.__dict__})
    iface.private_key = dev.private_key
    iface.listen_port = dev.listen_port or None
    iface.fwmark = dev.fwmark or None
    peers = [
        PeerConfig(
            p.public_key,
            p.preshared_key,
            [ipaddress.ip_network(a) for a in p.allowed_ips],
            p.endpoint,
            p.persistent_keepalive or None,
        )
        for p in dev.peers
    ]
    return Config(iface, peers)


def render(cfg: Config) -> str:
    """The file `wg-quick save` writes: wg-quick's keys, then what `wg showconf` prints."""
    i = cfg.interface
    lines = ["[Interface]"]
    lines += [f"Address = {a}" for a in i.addresses]
    lines += [f"DNS = {d}" for d in i.dns + i.dns_search]
    if i.mtu:
        lines.append(f"MTU = {i.mtu}")
    if i.table:
        lines.append(f"Table = {i.table}")
    if i.save_config:
        lines.append("SaveConfig = true")
    for key, hooks in (("PreUp", i.pre_up), ("PostUp", i.post_up), ("PreDown", i.pre_down),
                       ("PostDown", i.post_down)):  # fmt: skip
        lines += [f"{key} = {h}" for h in hooks]
    if i.listen_port:
        lines.append(f"ListenPort = {i.listen_port}")
    if i.fwmark:
        lines.append(f"FwMark = 0x{i.fwmark:x}")
    if i.private_key:
        lines.append(f"PrivateKey = {encode_key(i.private_key)}")
    for p in cfg.peers:
        lines += ["", "[Peer]", f"PublicKey = {encode_key(p.public_key)}"]
        if p.preshared_key:
            lines.append(f"PresharedKey = {encode_key(p.preshared_key)}")
        if p.allowed_ips:
            lines.append("AllowedIPs = " + ", ".join(str(n) for n in p.allowed_ips))
        if p.endpoint:
            lines.append(f"Endpoint = {p.endpoint}")
        if p.persistent_keepalive:
            lines.append(f"PersistentKeepalive = {p.persistent_keepalive}")
    return "\n".join(lines) + "\n"


def write_atomic(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> None:
    """Write a file so that it is either the old one or the whole new one: a temporary
    file beside it, flushed to the disk, then renamed over it (and the folder synced).
    The temporary file is made new (O_EXCL, O_NOFOLLOW, a random name, mode 0600 until
    `mode` is set on it): nothing planted beside the target (a symlink, a file readable
    by others) is ever written through or renamed over the target."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as f:  # closed also when fchmod fails
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise
    dirfd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)
