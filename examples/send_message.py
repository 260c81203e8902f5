"""
Publish one message to every browser on a sockdrawer channel.

Usage::

    python send_message.py "hello, browsers"                    # the quickstart node's HTTP API
    python send_message.py --url redis://localhost:6379/0 "hi"  # Redis, for nodes started with --redis
    python send_message.py --channel news "extra, extra"

Exit status: 0 when the message reached someone, 2 when it was published but
nothing received it (no socket or listener on the channel, or no node
subscribed to that Redis), 1 when publishing failed.
"""

import argparse
import os
import sys

from sockdrawer import Client, PublishError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("message", help="the message to send")
    parser.add_argument("--channel", default="chat", help="channel to publish on (default: chat)")
    parser.add_argument(
        "--url",
        default=None,
        help="http://host:8021 for a node's HTTP API, redis://... for Redis "
        "(default: $SOCKDRAWER_URL, else http://127.0.0.1:8021, the quickstart node's API)",
    )
    parser.add_argument("--api-key", default=None, help="API key, for an API started with --api-key")
    args = parser.parse_args()
    url = args.url or os.environ.get("SOCKDRAWER_URL") or "http://127.0.0.1:8021"
    try:
        with Client(url, api_key=args.api_key) as client:
            result = client.pub(args.message, channel=args.channel)
    except (ValueError, PublishError) as e:
        print(f"send_message: {e}", file=sys.stderr)
        return 1
    if isinstance(result, str):  # kept in history: its offset
        print(f"published on {args.channel!r} at offset {result}")
        return 0
    if not result:
        where = "no node is subscribed to that Redis" if url.startswith(("redis", "unix")) else (
            "the node has no socket or listener on that channel")
        print(f"send_message: published on {args.channel!r} at {url}, but nothing received it: {where}",
              file=sys.stderr)
        return 2
    print(f"published on {args.channel!r}; {result} received it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
