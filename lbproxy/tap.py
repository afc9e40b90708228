"""twistd glue: command-line options and ``makeService`` for ``twistd lbproxy``."""

from __future__ import annotations

from twisted.application.service import MultiService
from twisted.python import usage


class Options(usage.Options):
    """Command-line options of ``twistd lbproxy``."""

    optParameters = [
        ["config", "c", "/etc/lbproxy/lbproxy.toml", "Path to the configuration file."],
    ]


def makeService(options: Options) -> MultiService:
    """Build the balancer's service tree from the configuration file."""
    return MultiService()
