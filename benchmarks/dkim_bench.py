"""DKIM signing cost per message: mailrelay's ``DKIMSigner`` beside dkimpy's ``dkim.sign``.

Run from the repository root (needs the ``dkim`` extra and dkimpy, both in ``.[dev]``)::

    python benchmarks/dkim_bench.py [--count 300] [--repeat 5]

Both sides sign the same wire bytes (CRLF line ends) with the same public test keys
(``tests/data/dkim/``), the same canonicalization (relaxed/relaxed), the same signed
header fields and no ``l=``. For each message size and key it prints microseconds per
signature (best of ``--repeat`` runs of ``--count`` signatures) and the ratio; each
side's signature is checked once by dkimpy's verifier against the test keys first, so
the figures compare two working signers. It asserts nothing else.

mailrelay signs a :class:`~mailrelay.message.Message` (reading its wire form once through
``chunks()`` and hashing the body as it streams); dkimpy takes the message as one
``bytes`` object. mailrelay's key operation is one ``cryptography`` call; dkimpy signs
RSA in pure Python and Ed25519 through PyNaCl, so most of the RSA difference is the key
operation, while the Ed25519 rows show the cost of canonicalizing and hashing.
"""

from __future__ import annotations

import argparse
import base64
import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import dkim  # type: ignore[import-untyped]  # noqa: E402  # dkimpy ships no type information

from mailrelay.dkim import DEFAULT_HEADERS, DKIMSigner  # noqa: E402
from mailrelay.message import Message  # noqa: E402

KEYS = ROOT / "tests" / "data" / "dkim"
DOMAIN = "dkim.test"
#: (selector, PEM file) of the keys compared.
SELECTORS = (("sel-rsa", "rsa2048.pem"), ("sel-ed", "ed25519.pem"))


def make_message(size: int) -> bytes:
    """A plain-text message of about ``size`` bytes, CRLF line ends."""
    header = (
        b"From: Ann <ann@dkim.test>\r\nTo: bob@example.net\r\nSubject: benchmark\r\n"
        b"Date: Sun, 29 Nov 2026 09:00:00 +0000\r\nMessage-ID: <bench@dkim.test>\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    )
    line = b"A line of text for the benchmark, with  two spaces and a tab\t.\r\n"
    return header + line * max(1, (size - len(header)) // len(line))


def public_key(pem: bytes) -> bytes:
    """The ``p=`` value dkimpy needs to verify a signature made with ``pem``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = serialization.load_pem_private_key(pem, password=None)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return b"v=DKIM1; k=ed25519; p=" + base64.b64encode(raw)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)


def dkimpy_key(pem: bytes) -> tuple[bytes, bytes]:
    """The private key and algorithm as dkimpy takes them (Ed25519: the base64 raw seed)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = serialization.load_pem_private_key(pem, password=None)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return base64.b64encode(raw), b"ed25519-sha256"
    return pem, b"rsa-sha256"


def best(run: Callable[[], object], count: int, repeat: int) -> float:
    """Microseconds per call, the best of ``repeat`` rounds of ``count`` calls."""
    rounds = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(count):
            run()
        rounds.append((time.perf_counter() - start) / count * 1e6)
    return min(rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=5)
    options = parser.parse_args()
    headers = [name.encode() for name in DEFAULT_HEADERS]
    print(f"µs per signature, best of {options.repeat} x {options.count} (relaxed/relaxed)")
    print(f"{'message':>9} {'key':>8} {'mailrelay':>10} {'dkimpy':>10} {'ratio':>6}")
    for size in (1024, 10 * 1024, 100 * 1024):
        raw = make_message(size)
        message = Message.from_bytes(raw)
        for selector, filename in SELECTORS:
            pem = (KEYS / filename).read_bytes()
            record = public_key(pem)

            def dnsfunc(name: bytes | str, timeout: int = 5, _record: bytes = record) -> bytes:
                return _record

            signer = DKIMSigner(domain=DOMAIN, selector=selector, private_key=pem)
            their_key, algorithm = dkimpy_key(pem)

            def peer_sign(
                _raw: bytes = raw,
                _key: bytes = their_key,
                _alg: bytes = algorithm,
                _sel: str = selector,
            ) -> bytes:
                return dkim.sign(  # type: ignore[no-any-return]
                    _raw,
                    _sel.encode(),
                    DOMAIN.encode(),
                    _key,
                    canonicalize=(b"relaxed", b"relaxed"),
                    include_headers=headers,
                    signature_algorithm=_alg,
                )

            ours = signer.sign(message).as_bytes()
            assert dkim.verify(ours, dnsfunc=dnsfunc), "mailrelay's signature did not verify"
            assert dkim.verify(peer_sign() + raw, dnsfunc=dnsfunc), "dkimpy's did not verify"
            mine = best(functools.partial(signer.sign, message), options.count, options.repeat)
            peer = best(peer_sign, options.count, options.repeat)
            kind = "RSA-2048" if "rsa" in selector else "Ed25519"
            print(
                f"{size // 1024:>6} KB {kind:>8} {mine:>10.0f} {peer:>10.0f} {peer / mine:>5.1f}x"
            )


if __name__ == "__main__":
    main()
