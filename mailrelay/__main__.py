"""``python -m mailrelay``: the ``mailrelay`` command line (:func:`mailrelay.cli.main`)."""

from __future__ import annotations

import sys

from mailrelay.cli import main

if __name__ == "__main__":
    sys.exit(main())
