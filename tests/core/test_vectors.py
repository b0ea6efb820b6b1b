"""Known answers for the handshake: cacophony's Noise_IKpsk2 vector replayed through our
handshake code, and an initiation captured from a real wireguard-go."""

from __future__ import annotations

from wgpy.core import noise
from wgpy.core.cookie import CookieChecker
from wgpy.core.crypto import aead_decrypt, aead_encrypt, dh, public_key
from wgpy.core.messages import parse_initiation

# cacophony vectors/cacophony.txt, protocol Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s
PROLOGUE = bytes.fromhex("4a6f686e2047616c74")
PSK = bytes.fromhex("54686973206973206d7920417573747269616e20706572737065637469766521")
INIT_STATIC = bytes.fromhex("e61ef9919cde45dd5f82166404bd08e38bceb5dfdfded0a34c8df7ed542214d1")
INIT_EPHEMERAL = bytes.fromhex("893e28b9dc6ca8d611ab664754b8ceb7bac5117349a4439a6b0569da977c464a")
RESP_STATIC = bytes.fromhex("4a3acbfdb163dec651dfa3194dece676d437029c62a408b4c5ea9114246e4893")
RESP_EPHEMERAL = bytes.fromhex("bbdb4cdbd309f1a1f2e1456967fe288cadd6f712d65dc7b7793d5e63da6b375b")
HANDSHAKE_HASH = "f5191b875290abcd41347ac3622d9679688a7e980229cb937ef748336cfde0e5"
MESSAGES = [  # (payload, ciphertext): two handshake messages, then transport both ways
    ("4c756477696720766f6e204d69736573",
     "ca35def5ae56cec33dc2036731ab14896bc4c75dbb07a61f879f8e3afa4c7944001e21de9f98ddd8e2ad5752"
     "7207feb56253c9c94a9e496782ecfcb2a75fbcaf1b52948cc48daefe660c62119ab5000980c84831215f2441"
     "eba616548e832985464cf17e51ee93109008399a21f7e13f"),
    ("4d757272617920526f746862617264",
     "95ebc60d2b1fa672c1f46a8aa265ef51bfe38e7ccb39ec5be34069f144808843cb765f2caef0751b8f0075"
     "72dab0322217755c0632f365717edbf34d33e87a"),
    ("462e20412e20486179656b", "8153ca9833bc3c1b91a7e66e5f4d4f5b59bf9e64c2f20d15f0bba7"),
    ("4361726c204d656e676572", "07af0c9c86e1b4e80f36b04ff7688d51141af3debd0332f0a705ef"),
]  # fmt: skip


def test_cacophony_ikpsk2_vector() -> None:
    resp_pub = public_key(RESP_STATIC)
    init_pub = public_key(INIT_STATIC)
    payload1, expect1 = (bytes.fromhex(x) for x in MESSAGES[0])
    # initiator, message 1
    i_sym = noise.SymmetricState(resp_pub, prologue=PROLOGUE)
    e_pub, enc_static, enc_payload = noise.create_initiation(
        i_sym, INIT_STATIC, resp_pub, dh(INIT_STATIC, resp_pub), INIT_EPHEMERAL, payload1
    )
    assert e_pub + enc_static + enc_payload == expect1
    # responder reads it
    r_sym = noise.SymmetricState(resp_pub, prologue=PROLOGUE)
    assert noise.consume_initiation_static(r_sym, RESP_STATIC, e_pub, enc_static) == init_pub
    static_static = dh(RESP_STATIC, init_pub)
    assert noise.consume_initiation_payload(r_sym, static_static, enc_payload) == payload1
    # responder, message 2 (the psk is mixed in here: IKpsk2)
    payload2, expect2 = (bytes.fromhex(x) for x in MESSAGES[1])
    re_pub, enc2 = noise.create_response(r_sym, RESP_EPHEMERAL, e_pub, init_pub, PSK, payload2)
    assert re_pub + enc2 == expect2
    got = noise.consume_response(i_sym, INIT_EPHEMERAL, INIT_STATIC, re_pub, PSK, enc2)
    assert got == payload2
    assert i_sym.h.hex() == r_sym.h.hex() == HANDSHAKE_HASH
    # transport: initiator sends with the first key, counters from 0
    i_send, i_recv = i_sym.split(initiator=True)
    r_send, r_recv = r_sym.split(initiator=False)
    assert (i_send, i_recv) == (r_recv, r_send)
    for n, (payload, ciphertext) in enumerate(MESSAGES[2:]):
        key = i_send if n % 2 == 0 else r_send
        assert aead_encrypt(key, n // 2, bytes.fromhex(payload), b"").hex() == ciphertext
        assert aead_decrypt(key, n // 2, bytes.fromhex(ciphertext), b"").hex() == payload


# An initiation sent by Debian's wireguard-go 0.0.20220316 (captured on loopback in a
# network namespace); the responder's private key and the initiator's public key are ours.
CAPTURED_INITIATION = bytes.fromhex(
    "0100000037b01a0cb6192601425a2d5567727866241ded6d7452077816dcf77a9734f1c1e1dfdc35510e65"
    "59c8b433bec23c33e8f9aef17e7ba58d565266b23d92c2933e6780158d9feb8ba537fefcc96972f3977725"
    "8aab903f336513b06828006558d430a40332a629d188ae7bb4e7099798a2ff85b97e3e327006fe05bedf84"
    "a6351900000000000000000000000000000000"
)
RESPONDER_PRIVATE = bytes.fromhex("a8" * 31 + "40")
INITIATOR_PUBLIC = bytes.fromhex("b0de4ccb61c08ccb2f4a14cde9a1cab737048ef50892594abd60cf631c5f226e")


def test_mac1_of_a_real_wireguard_go_initiation() -> None:
    checker = CookieChecker(lambda n: bytes(n))
    checker.set_public_key(public_key(RESPONDER_PRIVATE))
    assert checker.check_mac1(CAPTURED_INITIATION)
    for bit in (0, 8 * 50, 8 * 120):  # any change, in the body or in mac1 itself
        forged = bytearray(CAPTURED_INITIATION)
        forged[bit // 8] ^= 1
        assert not checker.check_mac1(bytes(forged))
    checker.set_public_key(public_key(bytes([7]) * 32))  # someone else's key
    assert not checker.check_mac1(CAPTURED_INITIATION)


def test_our_responder_reads_a_real_wireguard_go_initiation() -> None:
    msg = parse_initiation(CAPTURED_INITIATION)
    sym = noise.SymmetricState(public_key(RESPONDER_PRIVATE))
    initiator = noise.consume_initiation_static(sym, RESPONDER_PRIVATE, msg.ephemeral, msg.static)
    assert initiator == INITIATOR_PUBLIC
    timestamp = noise.consume_initiation_payload(
        sym, dh(RESPONDER_PRIVATE, initiator), msg.timestamp
    )
    seconds = int.from_bytes(timestamp[:8], "big") - (1 << 62)
    assert 1_700_000_000 < seconds < 2_100_000_000  # a TAI64N label of the capture date
