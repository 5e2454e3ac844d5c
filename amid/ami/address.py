"""``host[:port]`` text, read one way (AMI servers in the config and the library, the http
listen address) and shown one way (those and the sink peers): ``pbx``, ``pbx:5039``,
``[2001:db8::1]:5038``, ``[2001:db8::1]``, or a bare IPv6 address (which has no port)."""

from __future__ import annotations


def split_host(text: str) -> tuple[str, str | None]:
    """``host`` and the text of its port (None when there is none), not checked: ``pbx:abc``
    gives ``("pbx", "abc")``. Raises ValueError for an unclosed bracket or text after one."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"invalid address {text!r}")
        return host, rest[1:] if rest else None
    if text.count(":") == 1:
        host, _, port_text = text.partition(":")
        return host, port_text
    return text, None  # no colon, or a bare IPv6 address


def split_host_port(text: str) -> tuple[str, int | None]:
    """Split ``host:port``, ``[v6]:port``, ``[v6]`` or a bare host/IPv6 address; the port is
    None when there is none.

    Raises ValueError when the text is malformed or the port is not a number in 0..65535.
    """
    host, port_text = split_host(text)
    if port_text is None:
        return host, None
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"invalid port {port_text!r} in {text!r}")
    return host, int(port_text)


def format_host(host: str) -> str:
    """``host`` as it stands before ``:port``: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


def parse_host(text: str, default_port: int) -> tuple[str, int]:
    """``"pbx"`` -> ``("pbx", default_port)``; ``"pbx:5039"``; ``"[::1]:5038"``; ``"::1"``.

    Raises ValueError for a port that is not a number or stray text; the port's range is the
    caller's to check (each says it its own way)."""
    host, port_text = split_host(text)
    if port_text is None:
        return host, default_port
    if not port_text.isdigit():
        raise ValueError(f"invalid port {port_text!r} in {text!r}")
    return host, int(port_text)
