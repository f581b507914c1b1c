"""Score Address.parse against the isemail corpus (tests/data/isemail).

Each test's diagnosis is mapped to its category through meta.xml. The categories
ISEMAIL_VALID_CATEGORY, ISEMAIL_DNSWARN and ISEMAIL_RFC5321 are usable envelope
addresses; ISEMAIL_CFWS, ISEMAIL_DEPREC, ISEMAIL_RFC5322 and ISEMAIL_ERR are not.

Prints the confusion table by category, lists every disagreement, and exits
with status 1 if any unusable address was accepted (a false accept).

Run: python benchmarks/isemail_score.py
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

from mailrelay.address import Address
from mailrelay.errors import InvalidAddress

CORPUS = Path(__file__).resolve().parent.parent / "tests" / "data" / "isemail"
CATEGORIES = [
    "ISEMAIL_VALID_CATEGORY",
    "ISEMAIL_DNSWARN",
    "ISEMAIL_RFC5321",
    "ISEMAIL_CFWS",
    "ISEMAIL_DEPREC",
    "ISEMAIL_RFC5322",
    "ISEMAIL_ERR",
]
USABLE = frozenset(CATEGORIES[:3])


def decode(encoded: str) -> str:
    """Undo the corpus's encoding of control character n as U+2400 + n."""
    return "".join(chr(ord(c) - 0x2400) if 0x2400 <= ord(c) <= 0x2432 else c for c in encoded)


def load() -> list[tuple[str, str, str, str]]:
    """Return (test key, address, diagnosis, category) for every test."""
    meta = ET.parse(CORPUS / "meta.xml").getroot()
    category = {item.get("id"): item.findtext("category") for item in meta.iter("item")}
    cases = []
    for name in ("tests.xml", "tests-original.xml"):
        for test in ET.parse(CORPUS / name).getroot().iter("test"):
            diagnosis = test.findtext("diagnosis") or ""
            found = category.get(diagnosis)
            if found is None:
                raise SystemExit(f"{name} test {test.get('id')}: unknown diagnosis {diagnosis}")
            key = f"{name}#{test.get('id')}"
            cases.append((key, decode(test.findtext("address") or ""), diagnosis, found))
    return cases


def main() -> int:
    """Print the table; return the exit status."""
    cases = load()
    table: Counter[tuple[str, bool]] = Counter()
    false_accepts: list[str] = []
    false_rejects: list[str] = []
    for key, text, diagnosis, category in cases:
        try:
            Address.parse(text)
        except InvalidAddress as error:
            accepted, why = False, str(error)
        else:
            accepted, why = True, "accepted"
        table[category, accepted] += 1
        line = f"  {key:<24} {diagnosis:<34} {text!r}\n      -> {why}"
        if accepted and category not in USABLE:
            false_accepts.append(line)
        elif not accepted and category in USABLE:
            false_rejects.append(line)

    print(f"isemail corpus: {len(cases)} addresses\n")
    print(f"| {'category':<24} | expected | accepted | rejected |")
    print(f"|{'-' * 26}|----------|----------|----------|")
    for category in CATEGORIES:
        expected = "usable" if category in USABLE else "unusable"
        print(
            f"| {category:<24} | {expected:<8} | {table[category, True]:>8} "
            f"| {table[category, False]:>8} |"
        )
    usable_ok = sum(table[c, True] for c in USABLE)
    unusable_ok = sum(table[c, False] for c in CATEGORIES if c not in USABLE)
    print(f"\nusable accepted:   {usable_ok}   false rejects: {len(false_rejects)}")
    print(f"unusable rejected: {unusable_ok}   false accepts: {len(false_accepts)}")
    if false_rejects:
        print("\nfalse rejects (usable addresses refused):")
        print("\n".join(false_rejects))
    if false_accepts:
        print("\nFALSE ACCEPTS (unusable addresses accepted):")
        print("\n".join(false_accepts))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
