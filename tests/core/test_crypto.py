"""Known answers for the primitives, and keys as `wg` makes them."""

from __future__ import annotations

import base64
import hashlib
import hmac as std_hmac
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from wgpy.core.crypto import (
    InvalidTag,
    aead_decrypt,
    aead_encrypt,
    clamp,
    decode_key,
    dh,
    encode_key,
    hash_,
    hchacha20,
    hide_keys,
    hmac,
    kdf,
    public_key,
    tai64n,
    xaead_decrypt,
    xaead_encrypt,
)

KDF_VECTORS = [  # wireguard-go device/kdf_test.go: key, input, t0, t1, t2
    ("746573742d6b6579", "746573742d696e707574",
     "6f0e5ad38daba1bea8a0d213688736f19763239305e0f58aba697f9ffc41c633",
     "df1194df20802a4fe594cde27e92991c8cae66c366e8106aaa937a55fa371e8a",
     "fac6e2745a325f5dc5d11a5b165aad08b0ada28e7b4e666b7c077934a4d76c24"),
    ("776972656775617264", "776972656775617264",
     "491d43bbfdaa8750aaf535e334ecbfe5129967cd64635101c566d4caefda96e8",
     "1e71a379baefd8a79aa4662212fcafe19a23e2b609a3db7d6bcba8f560e3d25f",
     "31e1ae48bddfbe5de38f295e5452b1909a1b4e38e183926af3780b0c1e1f0160"),
    ("", "",
     "8387b46bf43eccfcf349552a095d8315c4055beb90208fb1be23b894bc2ed5d0",
     "58a0e5f6faefccf4807bff1f05fa8a9217945762040bcec2f4b4a62bdfe0e86e",
     "0ce6ea98ec548f8e281e93e32db65621c45eb18dc6f0a7ad94178610a2f7338e"),
]  # fmt: skip


@pytest.mark.parametrize(("key", "data", "t0", "t1", "t2"), KDF_VECTORS)
def test_kdf_vectors(key: str, data: str, t0: str, t1: str, t2: str) -> None:
    k, d = bytes.fromhex(key), bytes.fromhex(data)
    assert [x.hex() for x in kdf(k, d, 3)] == [t0, t1, t2]
    assert [x.hex() for x in kdf(k, d, 2)] == [t0, t1]
    assert kdf(k, d, 1)[0].hex() == t0


@given(st.binary(max_size=64), st.binary(max_size=300))
def test_hmac_is_rfc2104_over_blake2s(key: bytes, data: bytes) -> None:
    assert hmac(key, data) == std_hmac.new(key, data, hashlib.blake2s).digest()


def test_blake2s_and_x25519_known_answers() -> None:
    assert hash_(b"abc").hex() == (
        "508c5e8c327c14e2e1a72ba34eeb452f37458b209ed63a294d999b4c86675982"
    )
    # RFC 7748 section 6.1
    alice = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    bob = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
    alice_pub = "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    bob_pub = "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
    shared = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
    assert public_key(alice).hex() == alice_pub and public_key(bob).hex() == bob_pub
    assert dh(alice, bytes.fromhex(bob_pub)).hex() == shared
    assert dh(bob, bytes.fromhex(alice_pub)).hex() == shared


RFC7748_SINGLE = [  # section 5.2: scalar, u-coordinate, output
    ("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4",
     "e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c",
     "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552"),
    ("4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d",
     "e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493",  # top bit set
     "95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957"),
]  # fmt: skip


@pytest.mark.parametrize(("scalar", "u", "out"), RFC7748_SINGLE)
def test_x25519_rfc7748_scalar_mult(scalar: str, u: str, out: str) -> None:
    assert dh(bytes.fromhex(scalar), bytes.fromhex(u)).hex() == out


def test_x25519_rfc7748_iterated() -> None:
    # section 5.2: k = u = 9, then k, u = X25519(k, u), k; after 1 and 1000 rounds
    k = u = (9).to_bytes(32, "little")
    for i in range(1, 1001):
        k, u = dh(k, u), k
        if i == 1:
            assert k.hex() == "422c8e7a6227d7bca1350b3e2bb7279f7897b87bb6854b783c60e80311ae3079"
    assert k.hex() == "684cf59ba83309552800ef566f2f4d3c1c3887c49360e3875f2eb94d99532c51"


def test_chacha20_poly1305_rfc8439_a5() -> None:
    # RFC 8439 A.5: its nonce 00000000 0102030405060708 is exactly WireGuard's layout
    # (32 zero bits, then a little-endian u64 counter).
    key = bytes.fromhex("1c9240a5eb55d38af333888604f6b5f0473917c1402b80099dca5cbc207075c0")
    counter = int.from_bytes(bytes.fromhex("0102030405060708"), "little")
    ad = bytes.fromhex("f33388860000000000004e91")
    plain = (
        b"Internet-Drafts are draft documents valid for a maximum of six months and may be "
        b"updated, replaced, or obsoleted by other documents at any time. It is inappropriate "
        b"to use Internet-Drafts as reference material or to cite them other than as "
        b"/\xe2\x80\x9cwork in progress./\xe2\x80\x9d"
    )
    sealed = bytes.fromhex(
        "64a0861575861af460f062c79be643bd5e805cfd345cf389f108670ac76c8cb2"
        "4c6cfc18755d43eea09ee94e382d26b0bdb7b73c321b0100d4f03b7f355894cf"
        "332f830e710b97ce98c8a84abd0b948114ad176e008d33bd60f982b1ff37c855"
        "9797a06ef4f0ef61c186324e2b3506383606907b6a7c02b0f9f6157b53c867e4"
        "b9166c767b804d46a59b5216cde7a4e99040c5a40433225ee282a1b0a06c523e"
        "af4534d7f83fa1155b0047718cbc546a0d072b04b3564eea1b422273f548271a"
        "0bb2316053fa76991955ebd63159434ecebb4e466dae5a1073a6727627097a10"
        "49e617d91d361094fa68f0ff77987130305beaba2eda04df997b714d6c6f2c29"
        "a6ad5cb4022b02709b"
        "eead9d67890cbb22392336fea1851f38"  # tag
    )
    assert aead_encrypt(key, counter, plain, ad) == sealed
    assert aead_decrypt(key, counter, sealed, ad) == plain
    with pytest.raises(InvalidTag):
        aead_decrypt(key, counter + 1, sealed, ad)


def test_low_order_points_are_refused() -> None:
    for point in (bytes(32), bytes([1]) + bytes(31)):
        with pytest.raises(ValueError):
            dh(clamp(os.urandom(32)), point)


def test_xchacha20_poly1305_draft_vectors() -> None:
    # draft-irtf-cfrg-xchacha-03, 2.2.1 (HChaCha20) and A.3.1 (the AEAD)
    key = bytes(range(32))
    sub = hchacha20(key, bytes.fromhex("000000090000004a0000000031415927"))
    assert sub.hex() == "82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc"
    key = bytes(range(0x80, 0xA0))
    nonce = bytes(range(0x40, 0x58))
    ad = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
    plain = (
        b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for "
        b"the future, sunscreen would be it."
    )
    sealed = xaead_encrypt(key, nonce, plain, ad)
    assert sealed.hex() == (
        "bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb"
        "731c7f1b0b4aa6440bf3a82f4eda7e39ae64c6708c54c216cb96b72e1213b452"
        "2f8c9ba40db5d945b11b69b982c1bb9e3f3fac2bc369488f76b2383565d3fff9"
        "21f9664c97637da9768812f615c68b13b52e"
        "c0875924c1c7987947deafd8780acf49"
    )
    assert xaead_decrypt(key, nonce, sealed, ad) == plain


def test_tai64n_layout() -> None:
    stamp = tai64n(1_700_000_000.5)
    assert len(stamp) == 12
    assert int.from_bytes(stamp[:8], "big") == (1 << 62) + 10 + 1_700_000_000  # TAI = UTC + 10
    nsec = int.from_bytes(stamp[8:], "big")
    assert nsec <= 500_000_000 and nsec % (1 << 24) == 0  # rounded down to 2^24 ns
    assert tai64n(1_700_000_000.5) == tai64n(1_700_000_000.5 + 0.001)  # ~16 ms resolution


_WALL = st.floats(min_value=0, max_value=4e9, allow_nan=False)


@given(_WALL, _WALL)
def test_tai64n_is_monotonic(a: float, b: float) -> None:
    a, b = min(a, b), max(a, b)
    assert tai64n(a) <= tai64n(b)  # byte order is time order
    if b - a >= 0.02:  # more than one rounding step apart: strictly later
        assert tai64n(a) < tai64n(b)


def test_key_encoding() -> None:
    key = os.urandom(32)
    assert decode_key(encode_key(key)) == key
    for bad in ("", "abc", base64.b64encode(bytes(31)).decode(), "!" * 44):
        with pytest.raises(ValueError):
            decode_key(bad)


@pytest.mark.skipif(shutil.which("wg") is None, reason="needs wireguard-tools")
def test_our_keys_match_the_wg_tool() -> None:
    def run(*argv: str, stdin: str = "") -> str:
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=True)
        return done.stdout.strip()

    wgpy = [sys.executable, "-m", "wgpy"]
    for _ in range(3):
        private = run(*wgpy, "genkey")
        assert run("wg", "pubkey", stdin=private) == run(*wgpy, "pubkey", stdin=private)
    private = run("wg", "genkey")
    assert run(*wgpy, "pubkey", stdin=private) == run("wg", "pubkey", stdin=private)
    assert len(base64.b64decode(run(*wgpy, "genpsk"))) == 32
    bad = subprocess.run([*wgpy, "pubkey"], input="nope", capture_output=True, text=True)
    assert bad.returncode == 1 and "key" in bad.stderr


@pytest.mark.parametrize("command", ["genkey", "genpsk"])
def test_a_key_into_a_world_accessible_file_warns_as_wg_does(command: str, tmp_path: Path) -> None:
    """`wgpy genkey > file` where others may read the file: the key is written, and stderr
    says so in wg's words; a private file (group access included) or a pipe: no warning."""
    tools = [[sys.executable, "-m", "wgpy"]] + ([["wg"]] if shutil.which("wg") else [])
    for tool in tools:
        for mode, warns in ((0o644, True), (0o604, True), (0o601, True), (0o640, False),
                            (0o600, False)):  # fmt: skip
            path = tmp_path / f"{tool[0].rsplit('/', 1)[-1]}-{mode:o}"
            path.touch(mode)
            path.chmod(mode)
            with path.open("w") as out:
                done = subprocess.run([*tool, command], stdout=out, stderr=subprocess.PIPE,
                                      text=True, check=True, timeout=30)  # fmt: skip
            assert len(base64.b64decode(path.read_text())) == 32
            assert done.stderr == (WORLD_ACCESSIBLE if warns else ""), (tool, mode)
        piped = subprocess.run([*tool, command], capture_output=True, text=True, timeout=30)
        assert piped.returncode == 0 and piped.stderr == ""


WORLD_ACCESSIBLE = (
    "Warning: writing to world accessible file.\n"
    "Consider setting the umask to 077 and trying again.\n"
)


KEY_SPELLINGS = {  # every way a 32-byte key gets pasted: as wg writes it, URL-safe, hex
    "base64": lambda k: base64.b64encode(k).decode(),
    "urlsafe": lambda k: base64.urlsafe_b64encode(k).decode(),
    "urlsafe, no padding": lambda k: base64.urlsafe_b64encode(k).decode().rstrip("="),
    "hex": lambda k: k.hex(),
    "HEX": lambda k: k.hex().upper(),
    "hex with spaces": lambda k: k.hex(" "),
    "hex with colons": lambda k: k.hex(":"),
    "HEX with colons": lambda k: k.hex(":").upper(),
    "hex with dashes": lambda k: k.hex("-"),
}


@pytest.mark.parametrize("spelling", KEY_SPELLINGS)
@given(key=st.binary(min_size=32, max_size=32), before=st.text(), after=st.text())
@example(key=bytes(6) + b"\x03\xe0" + bytes(12) + b">" + bytes(11), before="", after="/")
def test_hide_keys_hides_a_key_in_any_spelling_anywhere(
    spelling: str, key: bytes, before: str, after: str
) -> None:
    """An error message that quotes its input never carries a key on to a log, however
    the key was written and whatever surrounds it (glued to it included)."""
    written = KEY_SPELLINGS[spelling](key).rstrip("=")
    assert written not in hide_keys(before + written + after)


@pytest.mark.parametrize("spelling", KEY_SPELLINGS)
@pytest.mark.parametrize("glue", ["key_", "wg-", "peer_", "psk-", "a_b-"])
@given(key=st.binary(min_size=32, max_size=32))
def test_hide_keys_leaves_no_part_of_a_key_glued_to_a_name(
    spelling: str, glue: str, key: bytes
) -> None:
    """Glued to a name with "_" or "-" (`key_<key>`), no 8 characters of the key survive:
    a key's head hidden with the name and its tail left (after its first "+" or "/") once
    gave away up to 20 of its characters."""
    written = KEY_SPELLINGS[spelling](key).rstrip("=")
    out = hide_keys(f"bad value {glue}{written} here")
    assert not any(written[i : i + 8] in out for i in range(len(written) - 7)), out


@pytest.mark.parametrize(
    "text",
    [
        "invalid endpoint: '203.0.113.7:51820'",
        "invalid endpoint: '[2001:db8:ab:cd::1]:51820'",
        "invalid endpoint: 'vpn-gateway-frankfurt-01.example.com:51820'",
        "cannot resolve my-home-server-in-the-attic",
        "invalid UAPI peer key: 'persistent_keepalive_interval'",
        "WG_ENDPOINT_RESOLUTION_RETRIES is not a number",
        "device aa:bb:cc:dd:ee:ff has no address; mtu 1420",
        "10 20 30 40 50 60 70 80 are the peers' last octets",
        "PersistentKeepalive: bad value",
        "no such file: '/etc/wireguard/My-Home-Office-Tunnel-2026.conf'",
        "X-Content-Type-Options and Content-Security-Policy",
        "uuid 550e8400-e29b-41d4-a716-446655440000",
        # paths and host labels of 20 or more characters (review F6: hidden as keys)
        "no such file: '/var/lib/wgpy/private_keys/home-office'",
        "cannot read /home/alice/projects/wireguard-configs/office.conf",
        "/sys/class/net/wg0/queues/rx-0 is missing",
        "/usr/lib/python3/dist-packages/wgpy/__init__.py",
        "/srv/wireguard/configurations/datacenter/frankfurt/wg0.conf: 0644",
        "cannot resolve verylonghostnamewithoutdashes1234.example.com",
        "cannot resolve my-home-office-router-01.dyn.example.net:51820",
        "PersistentKeepalive and ListenPort and FwMark",
    ],
)
def test_hide_keys_leaves_ordinary_text_readable(text: str) -> None:
    assert hide_keys(text) == text


# lower-case words: up to 3 short ones ("wg0", "rx") before each of 4 letters or more
PATH_WORDS = st.lists(
    st.tuples(st.lists(st.from_regex(r"[a-z][a-z0-9]?", fullmatch=True), max_size=3),
              st.from_regex(r"[a-z]{4,12}[0-9]{0,2}", fullmatch=True)),
    min_size=1, max_size=5,
).map(lambda parts: [word for shorts, long in parts for word in (*shorts, long)])  # fmt: skip


@given(words=PATH_WORDS, glue=st.sampled_from("/-_."), lead=st.sampled_from(["", "/"]))
def test_hide_keys_leaves_paths_and_host_names_readable(
    words: list[str], glue: str, lead: str
) -> None:
    """A path, a host name or a dashed name of lower-case words, however long, is no key
    (with a word of 4 letters among every few: a key's length of 2-letter ones is hidden,
    as a key that repeats a byte may be written so: "f39/f39/f39/...")."""
    text = f"cannot open {lead}{glue.join(words)}: no such file"
    assert hide_keys(text) == text


KEY = base64.b64encode(bytes(range(7, 39))).decode()  # 44 characters, "=" the last
URL_KEY = base64.urlsafe_b64encode(bytes(range(200, 232))).decode()
REPEATED = base64.b64encode(bytes([0x7F]) * 32).decode()  # "f39/f39/...": words, nearly


@pytest.mark.parametrize(
    "text",
    [
        f"PrivateKey = {KEY}",
        f"no such file: '/etc/wireguard/keys/{KEY}'",
        f"/srv/keys/{URL_KEY}.key",
        f"a key cut short: {KEY[:40]}",  # 240 bits of the 256 shown: too many
        f"a key cut short: {URL_KEY[:36]}",
        f"hex: {bytes(range(32)).hex()}",
        f"hex cut short: {bytes(range(32)).hex()[:40]}",
        f"the zero key: {base64.b64encode(bytes(32)).decode()}",
        f"the all-ones key: {base64.b64encode(bytes([255]) * 32).decode()}",
        f"glued to a path: /home/alice/{KEY}",
        f"no such file: '/etc/wireguard/keys/{REPEATED}'",
    ],
)
def test_hide_keys_hides_keys_beside_paths_and_cut_short(text: str) -> None:
    hidden = hide_keys(text)
    keys = [KEY, URL_KEY, bytes(range(32)).hex(), base64.b64encode(bytes(32)).decode(),
            base64.b64encode(bytes([255]) * 32).decode(), REPEATED]  # fmt: skip
    assert not any(k[i : i + 12] in hidden for k in keys for i in range(len(k) - 11)), hidden
