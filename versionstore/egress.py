"""Where the server may connect on a client's behalf (remote `file` URLs, `notification_url`).

Default deny for every address that is not globally routable: loopback, private (RFC 1918,
ULA), link-local (169.254.0.0/16 holds cloud metadata services), CGNAT (100.64.0.0/10),
multicast, reserved, unspecified (0.0.0.0, ::), documentation and benchmarking ranges, and the
IPv6 forms that embed one of those (IPv4-mapped, 6to4, Teredo, NAT64). The operator's
allow-list (`VERSIONSTORE_FETCH_ALLOW`: host names and CIDRs) opens exceptions. The check is
applied to the addresses a connection actually uses, after DNS resolution, on every redirect hop.
"""

import ipaddress
from collections.abc import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def _embedded(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv4-mapped, 6to4 or NAT64 address reaches."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public(ip: IPAddress) -> bool:
    """Globally routable unicast. An IPv6 address embedding an IPv4 one is judged by that one;
    Teredo (a tunnel to wherever its client part says) is refused."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.teredo is not None:
            return False
        inner = _embedded(ip)
        if inner is not None:
            return is_public(inner)
    return ip.is_global and not ip.is_multicast and not ip.is_unspecified and not ip.is_reserved


def parse_ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


class EgressPolicy:
    """Decides whether an outgoing connection to a host name or an address is allowed."""

    def __init__(self, allow: Iterable[str] = ()) -> None:
        self.allowed_hosts: set[str] = set()
        self.allowed_networks: list[IPNetwork] = []
        for entry in allow:
            entry = entry.strip().lower()
            if not entry:
                continue
            try:
                self.allowed_networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                self.allowed_hosts.add(entry.rstrip("."))

    def host_allowed(self, host: str) -> bool:
        """True when the operator listed this host name (then any address it resolves to goes)."""
        return host.lower().rstrip(".") in self.allowed_hosts

    def address_allowed(self, address: str | IPAddress) -> bool:
        ip = parse_ip(address) if isinstance(address, str) else address
        if ip is None:
            return False
        if any(ip.version == net.version and ip in net for net in self.allowed_networks):
            return True
        return is_public(ip)
