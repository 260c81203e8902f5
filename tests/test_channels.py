"""Unit tests for the channel naming rules."""

from __future__ import annotations

import pytest

from sockdrawer.core.channels import ChannelNameError, Namespace, channel_from_path, validate_channel


@pytest.mark.parametrize(
    ("path", "key"),
    [
        ("/", b""),
        ("/news", b"news"),
        ("/rooms/42", b"rooms/42"),
        ("/room%201/sub", b"room 1/sub"),
        ("/caf%C3%A9", "café".encode()),
        ("/a.b/c-d_e", b"a.b/c-d_e"),
        ("/..x/x..", b"..x/x.."),
        ("/%2A", b"*"),
    ],
)
def test_valid_paths(path: str, key: bytes) -> None:
    """A valid path maps to its percent-decoded UTF-8 channel key; '/' is the root b''."""
    assert channel_from_path(path) == key


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/a//b", "empty segment"),
        ("/news/", "empty segment"),
        ("//", "empty segment"),
        ("/a/./b", "'.' or '..'"),
        ("/..", "'.' or '..'"),
        ("/a/%2E%2E", "'.' or '..'"),
        ("/a%00b", "control character"),
        ("/a%0Ab", "control character"),
        ("/a%7F", "control character"),
        ("/%C2%85", "control character"),
        ("/%zz", "bad percent-encoding"),
        ("/abc%4", "bad percent-encoding"),
        ("/%FF%FE", "not valid UTF-8"),
        ("/caf\u00e9", "percent-encoded ASCII"),
        ("news", "must start with '/'"),
        ("/" + "x" * 257, "too long"),
        ("/" + "%41" * 300, "too long"),
    ],
)
def test_refused_paths(path: str, reason: str) -> None:
    """An invalid path raises ChannelNameError whose message names the rule it broke."""
    with pytest.raises(ChannelNameError) as e:
        channel_from_path(path)
    assert reason in str(e.value)


def test_length_limit_counts_utf8_bytes() -> None:
    """The length limit applies to the key's UTF-8 bytes, and is configurable."""
    assert channel_from_path("/" + "x" * 256) == b"x" * 256
    assert channel_from_path("/abcd", max_length=4) == b"abcd"
    with pytest.raises(ChannelNameError):
        channel_from_path("/abcde", max_length=4)
    with pytest.raises(ChannelNameError):
        validate_channel("é" * 3, max_length=5)


def test_refusal_reason_never_echoes_input() -> None:
    """The reason (which goes into an HTTP status line) never contains the refused input."""
    evil = "/<script>%0D%0ASet-Cookie:x"
    with pytest.raises(ChannelNameError) as e:
        channel_from_path(evil)
    assert "script" not in str(e.value) and "Cookie" not in str(e.value)


def test_validate_channel_rules() -> None:
    """Channel names as publishers give them follow the same rules as paths, without the '/'."""
    assert validate_channel("") == b""
    assert validate_channel("rooms/42") == b"rooms/42"
    for bad in ("/news", "a//b", "a/", "..", "a\nb"):
        with pytest.raises(ChannelNameError):
            validate_channel(bad)
    with pytest.raises(ChannelNameError):
        validate_channel(b"news")  # type: ignore[arg-type]


def test_namespace_maps_both_ways() -> None:
    """Namespace N maps key k to Redis channel 'N/k' and back; other channels map to None."""
    ns = Namespace("sock-drawer")
    assert ns.pattern == b"sock-drawer/*"
    assert ns.redis_channel(b"rooms/42") == b"sock-drawer/rooms/42"
    assert ns.redis_channel(b"") == b"sock-drawer/"
    assert ns.key_from_redis(b"sock-drawer/rooms/42") == b"rooms/42"
    assert ns.key_from_redis(b"sock-drawer/") == b""
    assert ns.key_from_redis(b"other/rooms") is None
    assert ns.key_from_redis(b"sock-drawerX/a") is None


@pytest.mark.parametrize("name", ["", "a/b", "a*", "x?", "[x]", "a\nb"])
def test_namespace_refuses_bad_names(name: str) -> None:
    """A namespace with '/', glob or control characters, or empty, is refused."""
    with pytest.raises(ValueError):
        Namespace(name)
