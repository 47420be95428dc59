"""zep: a userspace SOCKS5 + HTTP proxy into an OpenZiti overlay."""

__version__ = "0.1.0"
