//! Addresses in QEMU's own syntax, and where each accepted connection is forwarded.
//!
//! QEMU's migration URIs are `tcp:HOST:PORT`, `tcp:[IPV6]:PORT` and `unix:PATH`; operators paste
//! them from libvirt and QMP, so migproxy takes exactly those. Two extensions:
//! - a port range `tcp:HOST:FIRST-LAST` (libvirt hands out 49152-49215): as a listen address it
//!   binds every port of the range, as an upstream it forwards to the same port the connection
//!   arrived on;
//! - the upstream modes `original-dst` (connections redirected by nftables `redirect`: the kernel
//!   keeps the original destination, read with `SO_ORIGINAL_DST`) and `tproxy` (connections
//!   delivered by nftables `tproxy`: the accepted socket's local address is the original
//!   destination).
//!
//! Interception with nftables (`redirect`, upstream `original-dst`; verified in a network namespace
//! with a proxy running as uid 65534 and a real stream). On the source host, for libvirt's ports:
//!
//! ```text
//! table inet migproxy {
//!   chain output {                     # migrations started on this host
//!     type nat hook output priority -100; policy accept;
//!     meta skuid "migproxy" return     # the proxy's own upstream connections go out as they are
//!     tcp dport 49152-49215 redirect to :4444
//!   }
//!   chain prerouting {                 # migrations routed through this host
//!     type nat hook prerouting priority -100; policy accept;
//!     tcp dport 49152-49215 redirect to :4444
//!   }
//! }
//! migproxy run --listen tcp:0.0.0.0:4444 --upstream original-dst
//! ```
//!
//! `tproxy` (a gateway that must not rewrite addresses; the listener is bound with IP_TRANSPARENT,
//! which needs CAP_NET_ADMIN; not exercised by the tests):
//!
//! ```text
//! table inet migproxy {
//!   chain prerouting {
//!     type filter hook prerouting priority mangle; policy accept;
//!     tcp dport 49152-49215 meta mark set 1 tproxy ip to 127.0.0.1:4444 accept
//!   }
//! }
//! ip rule add fwmark 1 lookup 100
//! ip route add local 0.0.0.0/0 dev lo table 100
//! migproxy run --listen tcp:127.0.0.1:4444 --upstream tproxy
//! ```

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

use crate::error::{AddressProblem, NoUpstream, ProxyError};

/// One endpoint: a TCP host and port, or a unix socket path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Address {
    /// `host` is kept as written (a name or an address; IPv6 without brackets).
    Tcp {
        host: String,
        port: u16,
    },
    Unix(PathBuf),
}

impl Address {
    pub fn from_socket_addr(addr: SocketAddr) -> Self {
        Address::Tcp {
            host: addr.ip().to_string(),
            port: addr.port(),
        }
    }

    /// `HOST:PORT` as the resolver takes it (IPv6 in brackets).
    pub fn host_port(host: &str, port: u16) -> String {
        if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp { host, port } => write!(f, "tcp:{}", Address::host_port(host, *port)),
            Address::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl FromStr for Address {
    type Err = ProxyError;

    fn from_str(text: &str) -> Result<Self, ProxyError> {
        match ListenSpec::from_str(text)? {
            ListenSpec::Tcp { host, first, last } if first == last => {
                Ok(Address::Tcp { host, port: first })
            }
            ListenSpec::Tcp { .. } => Err(ProxyError::address(
                text,
                AddressProblem::PortRangeNotAllowed,
            )),
            ListenSpec::Unix(path) => Ok(Address::Unix(path)),
        }
    }
}

/// A listen address; a TCP port range binds one socket per port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenSpec {
    Tcp { host: String, first: u16, last: u16 },
    Unix(PathBuf),
}

impl ListenSpec {
    /// Every single address this spec binds.
    pub fn addresses(&self) -> Vec<Address> {
        match self {
            ListenSpec::Tcp { host, first, last } => (*first..=*last)
                .map(|port| Address::Tcp {
                    host: host.clone(),
                    port,
                })
                .collect(),
            ListenSpec::Unix(path) => vec![Address::Unix(path.clone())],
        }
    }
}

impl fmt::Display for ListenSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenSpec::Tcp { host, first, last } if first == last => {
                write!(f, "tcp:{}", Address::host_port(host, *first))
            }
            ListenSpec::Tcp { host, first, last } => {
                write!(f, "tcp:{}-{last}", Address::host_port(host, *first))
            }
            ListenSpec::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl FromStr for ListenSpec {
    type Err = ProxyError;

    fn from_str(text: &str) -> Result<Self, ProxyError> {
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(ProxyError::address(text, AddressProblem::EmptyUnixPath));
            }
            return Ok(ListenSpec::Unix(PathBuf::from(path)));
        }
        let Some(rest) = text.strip_prefix("tcp:") else {
            return Err(ProxyError::address(text, AddressProblem::UnknownForm));
        };
        let (host, ports) = if let Some(bracketed) = rest.strip_prefix('[') {
            let Some((host, after)) = bracketed.split_once(']') else {
                return Err(ProxyError::address(text, AddressProblem::UnclosedBracket));
            };
            let Some(ports) = after.strip_prefix(':') else {
                return Err(ProxyError::address(
                    text,
                    AddressProblem::MissingPortAfterBracket,
                ));
            };
            (host, ports)
        } else {
            let Some((host, ports)) = rest.rsplit_once(':') else {
                return Err(ProxyError::address(text, AddressProblem::MissingPort));
            };
            if host.contains(':') {
                return Err(ProxyError::address(text, AddressProblem::UnbracketedIpv6));
            }
            (host, ports)
        };
        if host.is_empty() {
            return Err(ProxyError::address(text, AddressProblem::EmptyHost));
        }
        let parse_port = |p: &str| {
            p.parse::<u16>()
                .map_err(|_| ProxyError::address(text, AddressProblem::InvalidPort(p.to_owned())))
        };
        let (first, last) = match ports.split_once('-') {
            Some((first, last)) => (parse_port(first)?, parse_port(last)?),
            None => {
                let port = parse_port(ports)?;
                (port, port)
            }
        };
        if first > last {
            return Err(ProxyError::address(
                text,
                AddressProblem::EmptyPortRange { first, last },
            ));
        }
        Ok(ListenSpec::Tcp {
            host: host.to_owned(),
            first,
            last,
        })
    }
}

/// Where a listener forwards each accepted connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    /// Always this address.
    Fixed(Address),
    /// `tcp:HOST:FIRST-LAST`: HOST at the port the connection was accepted on, which must be in range.
    PortRange { host: String, first: u16, last: u16 },
    /// `original-dst`: the destination the client dialed before nftables `redirect` (SO_ORIGINAL_DST).
    OriginalDst,
    /// `tproxy`: the destination the client dialed, delivered by nftables `tproxy` as our local address.
    Tproxy,
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Upstream::Fixed(addr) => addr.fmt(f),
            Upstream::PortRange { host, first, last } => {
                write!(f, "tcp:{}-{last}", Address::host_port(host, *first))
            }
            Upstream::OriginalDst => f.write_str("original-dst"),
            Upstream::Tproxy => f.write_str("tproxy"),
        }
    }
}

impl FromStr for Upstream {
    type Err = ProxyError;

    fn from_str(text: &str) -> Result<Self, ProxyError> {
        match text {
            "original-dst" => return Ok(Upstream::OriginalDst),
            "tproxy" => return Ok(Upstream::Tproxy),
            _ => {}
        }
        match ListenSpec::from_str(text)? {
            ListenSpec::Tcp { host, first, last } if first == last => {
                Ok(Upstream::Fixed(Address::Tcp { host, port: first }))
            }
            ListenSpec::Tcp { host, first, last } => Ok(Upstream::PortRange { host, first, last }),
            ListenSpec::Unix(path) => Ok(Upstream::Fixed(Address::Unix(path))),
        }
    }
}

/// What the kernel told us about an accepted connection, as far as upstream selection needs it.
#[derive(Debug, Clone, Default)]
pub struct AcceptedInfo {
    /// The source's address (None on unix sockets).
    pub peer: Option<SocketAddr>,
    /// Our end of the connection (None on unix sockets).
    pub local: Option<SocketAddr>,
    /// SO_ORIGINAL_DST, read only when the upstream mode needs it.
    pub original_dst: Option<SocketAddr>,
}

impl Upstream {
    /// Whether the listener must read SO_ORIGINAL_DST on every accepted socket.
    pub fn needs_original_dst(&self) -> bool {
        matches!(self, Upstream::OriginalDst)
    }

    /// The address to dial for one accepted connection.
    pub fn resolve(&self, accepted: &AcceptedInfo) -> Result<Address, ProxyError> {
        match self {
            Upstream::Fixed(addr) => Ok(addr.clone()),
            Upstream::PortRange { host, first, last } => {
                let port = accepted
                    .local
                    .map(|l| l.port())
                    .ok_or_else(|| ProxyError::NoUpstream(NoUpstream::PortRangeNeedsTcp))?;
                if !(*first..=*last).contains(&port) {
                    return Err(ProxyError::NoUpstream(NoUpstream::OutsidePortRange {
                        port,
                        first: *first,
                        last: *last,
                    }));
                }
                Ok(Address::Tcp {
                    host: host.clone(),
                    port,
                })
            }
            Upstream::OriginalDst => accepted
                .original_dst
                .map(Address::from_socket_addr)
                .ok_or_else(|| ProxyError::NoUpstream(NoUpstream::NoOriginalDst)),
            Upstream::Tproxy => accepted
                .local
                .map(Address::from_socket_addr)
                .ok_or_else(|| ProxyError::NoUpstream(NoUpstream::TproxyNeedsTcp)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_syntax() {
        assert_eq!(
            "tcp:127.0.0.1:4444".parse::<Address>().ok(),
            Some(Address::Tcp {
                host: "127.0.0.1".into(),
                port: 4444
            })
        );
        assert_eq!(
            "tcp:[::1]:4444".parse::<Address>().ok(),
            Some(Address::Tcp {
                host: "::1".into(),
                port: 4444
            })
        );
        assert_eq!(
            "unix:/run/mig.sock".parse::<Address>().ok(),
            Some(Address::Unix("/run/mig.sock".into()))
        );
        assert_eq!(
            "tcp:dest.example:49152"
                .parse::<Address>()
                .ok()
                .map(|a| a.to_string()),
            Some("tcp:dest.example:49152".to_owned())
        );
        assert_eq!(
            "tcp:[fe80::1]:1"
                .parse::<Address>()
                .ok()
                .map(|a| a.to_string()),
            Some("tcp:[fe80::1]:1".to_owned())
        );
    }

    #[test]
    fn rejects_malformed_addresses() {
        for bad in [
            "127.0.0.1:4444",
            "tcp:127.0.0.1",
            "tcp::4444",
            "tcp:::1:4444",
            "tcp:[::1]4444",
            "tcp:host:70000",
            "tcp:host:5-4",
            "unix:",
            "tcp:host:1-2",
        ] {
            assert!(bad.parse::<Address>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn port_range_forwards_to_the_accepted_port() {
        let upstream: Upstream = "tcp:dest:49152-49215".parse().unwrap_or(Upstream::Tproxy);
        let info = |port| AcceptedInfo {
            local: Some(SocketAddr::from(([127, 0, 0, 1], port))),
            ..AcceptedInfo::default()
        };
        assert_eq!(
            upstream.resolve(&info(49160)).ok(),
            Some(Address::Tcp {
                host: "dest".into(),
                port: 49160
            })
        );
        assert!(upstream.resolve(&info(4444)).is_err());
        let spec: ListenSpec = "tcp:0.0.0.0:49152-49154"
            .parse()
            .unwrap_or(ListenSpec::Unix("x".into()));
        assert_eq!(spec.addresses().len(), 3);
    }

    #[test]
    fn interception_modes() {
        assert_eq!(
            "original-dst".parse::<Upstream>().ok(),
            Some(Upstream::OriginalDst)
        );
        let original = SocketAddr::from(([10, 0, 0, 7], 49153));
        let info = AcceptedInfo {
            original_dst: Some(original),
            local: Some(original),
            ..AcceptedInfo::default()
        };
        assert_eq!(
            Upstream::OriginalDst.resolve(&info).ok(),
            Some(Address::from_socket_addr(original))
        );
        assert_eq!(
            Upstream::Tproxy.resolve(&info).ok(),
            Some(Address::from_socket_addr(original))
        );
        assert!(Upstream::OriginalDst
            .resolve(&AcceptedInfo::default())
            .is_err());
    }
}
