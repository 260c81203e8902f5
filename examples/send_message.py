"""
Publish one message to every browser on a sockdrawer channel.

Usage::

    python send_message.py "hello, browsers"                   # Redis on localhost
    python send_message.py --url http://127.0.0.1:8021 "hi"    # a node's HTTP API
    python send_message.py --channel news "extra, extra"
"""

import argparse
import sys

from sockdrawer import Client, PublishError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("message", help="the message to send")
    parser.add_argument("--channel", default="chat", help="channel to publish on (default: chat)")
    parser.add_argument(
        "--url",
        default=None,
        help="redis://... for Redis, http://host:8021 for a node's HTTP API "
        "(default: $SOCKDRAWER_URL, else redis://localhost:6379/0)",
    )
    parser.add_argument("--api-key", default=None, help="API key, for an API started with --api-key")
    args = parser.parse_args()
    try:
        with Client(args.url, api_key=args.api_key) as client:
            count = client.pub(args.message, channel=args.channel)
    except (ValueError, PublishError) as e:
        print(f"send_message: {e}", file=sys.stderr)
        return 1
    print(f"published on {args.channel!r}; broker reports {count}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
