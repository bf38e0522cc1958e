//! The addresses migproxy itself listens on, so that no upstream is ever one of them.
//!
//! With `original-dst` or `tproxy`, a connection made straight to a listener (not redirected by
//! nftables) resolves its "original destination" to that listener: dialing it would make
//! migproxy connect to itself, forward the header, and the next hop do the same until every file
//! descriptor is used. So every resolved upstream is checked against every bound listener before
//! anything is dialed, and a fixed upstream is checked once at startup. A listener bound to a
//! wildcard (`0.0.0.0`, `::`) matches every local address at its port; "local" is asked of the
//! kernel (an address a plain socket can bind to is one of this host's).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::OnceLock;

use crate::net::addr::Address;

/// Every listener address of the daemon, known once all are bound.
#[derive(Debug, Default)]
pub struct OwnAddresses {
    bound: OnceLock<Vec<Address>>,
}

impl OwnAddresses {
    /// Record the bound addresses (with real ports); later calls are ignored.
    pub fn set(&self, bound: Vec<Address>) {
        let _ = self.bound.set(bound);
    }

    /// Whether dialing `upstream` would reach one of our own listeners.
    pub fn contains(&self, upstream: &Address) -> bool {
        let Some(bound) = self.bound.get() else {
            return false;
        };
        bound
            .iter()
            .any(|own| same_endpoint(own, upstream, is_local_ip))
    }
}

/// Whether `target` reaches the listener bound at `own`; `is_local` tells this host's addresses.
pub fn same_endpoint(own: &Address, target: &Address, is_local: impl Fn(IpAddr) -> bool) -> bool {
    match (own, target) {
        (Address::Unix(own), Address::Unix(target)) => same_path(own, target),
        (
            Address::Tcp {
                host: own_host,
                port: own_port,
            },
            Address::Tcp { host, port },
        ) => {
            if own_port != port {
                return false;
            }
            let (Some(own_ip), Some(target_ip)) = (ip_of(own_host), ip_of(host)) else {
                // A name: compared as written (fixed upstreams are resolved at startup).
                return own_host.eq_ignore_ascii_case(host);
            };
            if own_ip.is_unspecified() {
                // `::` also accepts IPv4 (dual stack), `0.0.0.0` only IPv4.
                let family_ok = own_ip.is_ipv6() || target_ip.is_ipv4();
                return family_ok && (target_ip.is_unspecified() || is_local(target_ip));
            }
            own_ip == target_ip || (target_ip.is_unspecified() && is_local(own_ip))
        }
        _ => false,
    }
}

fn ip_of(host: &str) -> Option<IpAddr> {
    host.parse::<IpAddr>().ok().map(|ip| ip.to_canonical())
}

fn same_path(a: &PathBuf, b: &PathBuf) -> bool {
    a == b
        || matches!(
            (std::fs::canonicalize(a), std::fs::canonicalize(b)),
            (Ok(x), Ok(y)) if x == y
        )
}

/// An address of this host: loopback, or one a socket without IP_TRANSPARENT can bind to.
pub fn is_local_ip(ip: IpAddr) -> bool {
    ip.is_loopback() || std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16) -> Address {
        Address::Tcp {
            host: host.to_owned(),
            port,
        }
    }

    #[test]
    fn wildcards_match_local_addresses_at_their_port_only() {
        let local = |ip: IpAddr| ip.is_loopback() || ip == IpAddr::from([10, 0, 0, 5]);
        let any4 = tcp("0.0.0.0", 4444);
        assert!(same_endpoint(&any4, &tcp("127.0.0.1", 4444), local));
        assert!(same_endpoint(&any4, &tcp("10.0.0.5", 4444), local));
        assert!(!same_endpoint(&any4, &tcp("10.0.0.6", 4444), local));
        assert!(!same_endpoint(&any4, &tcp("10.0.0.5", 4445), local));
        assert!(!same_endpoint(&any4, &tcp("::1", 4444), local));
        let any6 = tcp("::", 4444);
        assert!(same_endpoint(&any6, &tcp("::1", 4444), local));
        assert!(same_endpoint(&any6, &tcp("::ffff:10.0.0.5", 4444), local));
        assert!(same_endpoint(&any6, &tcp("10.0.0.5", 4444), local));
        let one = tcp("10.0.0.5", 4444);
        assert!(same_endpoint(&one, &tcp("10.0.0.5", 4444), local));
        assert!(!same_endpoint(&one, &tcp("127.0.0.1", 4444), local));
        assert!(same_endpoint(&one, &tcp("0.0.0.0", 4444), local));
        assert!(same_endpoint(
            &Address::Unix("/tmp/m.sock".into()),
            &Address::Unix("/tmp/m.sock".into()),
            local
        ));
    }

    #[test]
    fn the_kernel_knows_loopback_is_local_and_a_documentation_address_is_not() {
        assert!(is_local_ip(IpAddr::from([127, 0, 0, 1])));
        assert!(!is_local_ip(IpAddr::from([192, 0, 2, 77])));
    }

    #[test]
    fn nothing_is_own_before_the_listeners_are_bound() {
        let own = OwnAddresses::default();
        assert!(!own.contains(&tcp("127.0.0.1", 4444)));
        own.set(vec![tcp("127.0.0.1", 4444)]);
        assert!(own.contains(&tcp("127.0.0.1", 4444)));
        assert!(!own.contains(&tcp("127.0.0.1", 4445)));
    }
}
