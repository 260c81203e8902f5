"""
``python -m sockdrawer token``: mint a browser token from the command line
(for scripts and for trying private channels out)::

    python -m sockdrawer token --secret-file /etc/sockdrawer/secret --channel news --ttl 3600

The secret comes from a file or ``$SOCKDRAWER_AUTH_SECRET``, never from the
command line itself.
"""

from __future__ import annotations

import argparse
import os
import sys

from sockdrawer.core.tokens import make_token


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sockdrawer")
    commands = parser.add_subparsers(dest="command", required=True)
    token = commands.add_parser("token", help="mint a signed token naming the channels a browser may read")
    token.add_argument("--secret-file", help="file holding the shared secret (default: $SOCKDRAWER_AUTH_SECRET)")
    token.add_argument("--channel", action="append", default=[], metavar="PATTERN",
                       help="channel pattern the token covers: exact, prefix/* or * (repeatable)")
    token.add_argument("--user", help="the user (sub claim), handed to listeners")
    token.add_argument("--ttl", type=float, default=3600.0, help="seconds until the token expires [3600]")
    token.add_argument("--audience", help="aud claim")
    token.add_argument("--issuer", help="iss claim")
    token.add_argument("--algorithm", default="HS256", choices=["HS256", "HS384", "HS512"])
    args = parser.parse_args(argv)
    if args.secret_file:
        try:
            with open(args.secret_file, "rb") as f:
                secret = f.read().strip()
        except OSError as e:
            parser.error(f"--secret-file: cannot read {args.secret_file}: {e.strerror}")
    elif os.environ.get("SOCKDRAWER_AUTH_SECRET"):
        secret = os.environ["SOCKDRAWER_AUTH_SECRET"].encode("utf-8")
    else:
        parser.error("give --secret-file, or set SOCKDRAWER_AUTH_SECRET")
    if not args.channel:
        parser.error("give at least one --channel")
    try:
        print(make_token(secret, user=args.user, channels=args.channel, ttl=args.ttl, algorithm=args.algorithm,
                         audience=args.audience, issuer=args.issuer))
    except ValueError as e:
        parser.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
