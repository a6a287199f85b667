"""`companion key`: the API keys `companion serve` accepts (docs/serve.md, "Running it for others")."""

from __future__ import annotations

import argparse

HELP = "add, list and revoke the API keys clients of `companion serve` send"
DESCRIPTION = (
    "Named API keys for `companion serve`. `add NAME` prints a new key once (the key alone on the last line); "
    "only its hash is kept, in keys.yaml in the data folder. Each key has its own conversations. `list` shows "
    "the names, `revoke NAME` makes a key stop working at once (a running server reads the file again)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")  # none: list
    add = sub.add_parser("add", help="make a new key and print it once")
    add.add_argument("name", help="who or what the key is for (letters, digits, _ . -)")
    sub.add_parser("list", help="the keys' names and when they were made")
    revoke = sub.add_parser("revoke", help="make a key stop working")
    revoke.add_argument("name", help="the key's name (from `companion key list`)")


def run(args: argparse.Namespace) -> int:
    from companion.server.keys import KeyStore

    store = KeyStore()
    if args.action == "add":
        key = store.add(args.name)
        print(f"key '{args.name}' added; it is shown only now (clients send 'Authorization: Bearer KEY'):")
        print(key)
        return 0
    if args.action == "revoke":
        store.revoke(args.name)
        print(f"key '{args.name}' revoked")
        return 0
    entries = store.entries()
    if not entries:
        print("no keys: `companion key add NAME` makes one")
        return 0
    for entry in entries:
        print(f"{entry.name}\t{entry.created}")
    return 0
