//! Sockets and bytes, knowing nothing of migrations: QEMU-style addresses, connections and
//! dialing, bound listeners, TLS credentials, raw relays (copying and splice), write stall deadlines
//! and a minimal HTTP client.

pub mod addr;
pub mod conn;
pub mod http_client;
pub mod listener;
pub mod own_addresses;
pub mod prefixed;
pub mod relay;
pub mod splice;
pub mod stall;
pub mod tls;
