"""The public API of DESIGN.md §3: importable from the package root and documented."""

from __future__ import annotations

import inspect

import pytest

import mailrelay

PUBLIC = [name for name in mailrelay.__all__ if not name.startswith("_")]


@pytest.mark.parametrize("name", PUBLIC)
def test_public_name_is_importable_and_documented(name: str) -> None:
    obj = getattr(mailrelay, name)
    doc = inspect.getdoc(obj)
    assert doc, f"mailrelay.{name} has no docstring"


@pytest.mark.parametrize("name", PUBLIC)
def test_public_classes_document_their_public_methods(name: str) -> None:
    obj = getattr(mailrelay, name)
    if not inspect.isclass(obj):
        return
    undocumented = [
        attr
        for attr, member in vars(obj).items()
        if not attr.startswith("_")
        and (
            inspect.isfunction(member) or isinstance(member, (classmethod, staticmethod, property))
        )
        and not inspect.getdoc(getattr(obj, attr))
    ]
    assert undocumented == []


def test_every_public_name_is_listed_once() -> None:
    assert len(set(mailrelay.__all__)) == len(mailrelay.__all__)
    for name in mailrelay.__all__:
        assert hasattr(mailrelay, name)


def test_version_is_a_pep440_string() -> None:
    assert mailrelay.__version__[0].isdigit()
