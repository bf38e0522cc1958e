//! What kind of migration channel a new connection is, from its first bytes.
//!
//! DESIGN.md, "Connections": a plain connection identifies itself by its first 4 bytes - `QEVM`
//! (QEMU_VM_FILE_MAGIC) is a main channel, `11 22 33 44` (MULTIFD_MAGIC) a multifd channel, and
//! anything else can only be the postcopy preempt channel (bare RAM records, no magic) or a
//! postcopy-recovery main channel. Nothing is dialed before this is known: the destination QEMU has
//! exactly one incoming migration and a port probe reaching it would make that migration fail.
//!
//! The 7.2 preempt channel is opened at migration start and stays silent until postcopy ends, so
//! "sent nothing before the deadline" is not by itself proof of a stray; the migration layer
//! decides (it attaches such a connection only to a migration that advised postcopy).

use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::net::prefixed::PrefixedIo;

/// QEMU_VM_FILE_MAGIC (migration/savevm.c).
pub const QEMU_VM_FILE_MAGIC: [u8; 4] = *b"QEVM";
/// MULTIFD_MAGIC (migration/multifd.c).
pub const MULTIFD_MAGIC: [u8; 4] = [0x11, 0x22, 0x33, 0x44];

/// How a connection identified itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelKind {
    Main,
    Multifd,
    /// Postcopy preempt (or recovery): no magic of its own.
    Preempt,
}

impl ChannelKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelKind::Main => "main",
            ChannelKind::Multifd => "multifd",
            ChannelKind::Preempt => "preempt",
        }
    }
}

/// What a connection's first bytes say about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstBytes {
    /// Four bytes arrived and name the channel kind.
    Identified(ChannelKind),
    /// Four bytes arrived, neither magic: a preempt channel, or garbage.
    Unknown,
    /// Fewer than four bytes before the deadline (possibly none): a silent channel, or a probe.
    Silent,
    /// The peer closed before sending four bytes.
    Closed,
}

pub fn classify_magic(magic: [u8; 4]) -> Option<ChannelKind> {
    match magic {
        QEMU_VM_FILE_MAGIC => Some(ChannelKind::Main),
        MULTIFD_MAGIC => Some(ChannelKind::Multifd),
        _ => None,
    }
}

/// Read up to the first 4 bytes within `deadline`. The connection comes back carrying what was
/// read, so whatever forwards it later starts with those bytes.
pub async fn read_first_bytes<T: AsyncRead + Unpin>(
    mut io: T,
    deadline: Duration,
) -> (FirstBytes, PrefixedIo<T>) {
    let mut got = [0u8; 4];
    let mut filled = 0usize;
    let sleep = tokio::time::sleep(deadline);
    tokio::pin!(sleep);
    let mut outcome = None;
    while filled < got.len() {
        let Some(window) = got.get_mut(filled..) else {
            break;
        };
        tokio::select! {
            read = io.read(window) => match read {
                Ok(0) | Err(_) => {
                    outcome = Some(FirstBytes::Closed);
                    break;
                }
                Ok(n) => filled = filled.saturating_add(n),
            },
            () = &mut sleep => {
                outcome = Some(FirstBytes::Silent);
                break;
            }
        }
    }
    let first = outcome.unwrap_or_else(|| match classify_magic(got) {
        Some(kind) => FirstBytes::Identified(kind),
        None => FirstBytes::Unknown,
    });
    let prefix = Bytes::copy_from_slice(got.get(..filled).unwrap_or_default());
    (first, PrefixedIo::new(prefix, io))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    #[tokio::test]
    async fn identifies_by_magic_even_when_split() -> std::io::Result<()> {
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b"QE").await?;
        let reading =
            tokio::spawn(async move { read_first_bytes(server, Duration::from_secs(5)).await });
        client.write_all(b"VM\0\0\0\x03").await?;
        drop(client);
        let (first, mut io) = reading.await.map_err(std::io::Error::other)?;
        assert_eq!(first, FirstBytes::Identified(ChannelKind::Main));
        // The magic is read again, then the rest of the stream.
        let mut all = Vec::new();
        io.read_to_end(&mut all).await?;
        assert_eq!(all, b"QEVM\0\0\0\x03");

        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(&MULTIFD_MAGIC).await?;
        let (first, io) = read_first_bytes(server, Duration::from_secs(5)).await;
        assert_eq!(first, FirstBytes::Identified(ChannelKind::Multifd));
        assert_eq!(io.prefix(), MULTIFD_MAGIC);
        Ok(())
    }

    async fn first_bytes(sent: &[u8], close: bool, deadline: Duration) -> (FirstBytes, Vec<u8>) {
        let (mut client, server): (DuplexStream, DuplexStream) = tokio::io::duplex(64);
        if client.write_all(sent).await.is_err() {
            return (FirstBytes::Closed, Vec::new());
        }
        if close {
            drop(client);
            let (first, io) = read_first_bytes(server, deadline).await;
            return (first, io.prefix().to_vec());
        }
        let (first, io) = read_first_bytes(server, deadline).await;
        drop(client);
        (first, io.prefix().to_vec())
    }

    #[tokio::test]
    async fn silent_garbage_and_closed() {
        assert_eq!(
            first_bytes(b"G", false, Duration::from_millis(50)).await,
            (FirstBytes::Silent, b"G".to_vec())
        );
        assert_eq!(
            first_bytes(b"GET / HTTP/1.0\r\n", false, Duration::from_secs(5)).await,
            (FirstBytes::Unknown, b"GET ".to_vec())
        );
        assert_eq!(
            first_bytes(b"", true, Duration::from_secs(5)).await,
            (FirstBytes::Closed, Vec::new())
        );
        assert_eq!(
            first_bytes(b"QE", true, Duration::from_secs(5)).await,
            (FirstBytes::Closed, b"QE".to_vec())
        );
    }
}
