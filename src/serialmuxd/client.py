"""Client commands of the ``serialmuxd`` CLI (list, attach, log, …) over the HTTP API."""

from __future__ import annotations

import argparse

HELP = {
    "list": "list consoles and their state",
    "status": "show one console",
    "attach": "attach to a console interactively (Ctrl-] then . detaches, ? for help)",
    "log": "print a console's ring log",
    "wait": "wait until a console's output matches a regex",
    "sysrq": "send magic SysRq KEY (BREAK then the key)",
    "nmi": "inject an NMI into the VM",
    "reset": "reset the VM",
    "enable": "enable a console, or the whole service without NAME",
    "disable": "disable a console, or the whole service without NAME",
}


def add_arguments(name: str, p: argparse.ArgumentParser) -> None:
    if name in {"attach", "log", "wait", "sysrq", "nmi", "reset", "status"}:
        p.add_argument("name", metavar="NAME", help="console name")
    if name in {"enable", "disable"}:
        p.add_argument("name", metavar="NAME", nargs="?", help="console name (omit for the whole service)")


def main(cmd: str, args: argparse.Namespace) -> int:
    raise SystemExit(f"serialmuxd {cmd}: not available in this build")
