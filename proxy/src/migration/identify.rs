//! What kind of migration channel a new connection is, from its first bytes.
//!
//! design-decisions §3: a plain connection identifies itself by its first 4 bytes - `QEVM`
//! (QEMU_VM_FILE_MAGIC) is a main channel, `11 22 33 44` (MULTIFD_MAGIC) a multifd channel, and
//! anything else can only be the postcopy preempt channel (bare RAM records, no magic) or a
//! postcopy-recovery main channel. Nothing is dialed before this is known: the destination QEMU has
//! exactly one incoming migration and a port probe reaching it would make that migration fail.
//!
//! The 7.2 preempt channel is opened at migration start and stays silent until postcopy ends, so
//! "sent nothing before the deadline" is not by itself proof of a stray; the migration layer
//! decides (it attaches such a connection only to a migration that advised postcopy).

use std::time::Duration;

use tokio::io::AsyncReadExt;

use crate::net::conn::ConnRead;

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

/// The outcome of reading a connection's first bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum FirstBytes {
    /// Four bytes arrived and name the channel kind.
    Identified(ChannelKind, [u8; 4]),
    /// Four bytes arrived, neither magic: a preempt channel, or garbage.
    Unknown([u8; 4]),
    /// Fewer than four bytes before the deadline (possibly none): a silent channel, or a probe.
    Silent(Vec<u8>),
    /// The peer closed before sending four bytes.
    Closed(Vec<u8>),
}

impl FirstBytes {
    /// The bytes already consumed from the socket, to be forwarded first.
    pub fn prefix(&self) -> &[u8] {
        match self {
            FirstBytes::Identified(_, b) | FirstBytes::Unknown(b) => b,
            FirstBytes::Silent(b) | FirstBytes::Closed(b) => b,
        }
    }
}

pub fn classify_magic(magic: [u8; 4]) -> Option<ChannelKind> {
    match magic {
        QEMU_VM_FILE_MAGIC => Some(ChannelKind::Main),
        MULTIFD_MAGIC => Some(ChannelKind::Multifd),
        _ => None,
    }
}

/// Read up to the first 4 bytes within `deadline`.
pub async fn read_first_bytes(reader: &mut ConnRead, deadline: Duration) -> FirstBytes {
    let mut got = [0u8; 4];
    let mut filled = 0usize;
    let sleep = tokio::time::sleep(deadline);
    tokio::pin!(sleep);
    while filled < got.len() {
        let Some(window) = got.get_mut(filled..) else {
            break;
        };
        tokio::select! {
            read = reader.read(window) => match read {
                Ok(0) | Err(_) => return FirstBytes::Closed(got.get(..filled).unwrap_or_default().to_vec()),
                Ok(n) => filled = filled.saturating_add(n),
            },
            () = &mut sleep => return FirstBytes::Silent(got.get(..filled).unwrap_or_default().to_vec()),
        }
    }
    match classify_magic(got) {
        Some(kind) => FirstBytes::Identified(kind, got),
        None => FirstBytes::Unknown(got),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::conn::Conn;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    async fn pair() -> std::io::Result<(TcpStream, ConnRead)> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let client = TcpStream::connect(listener.local_addr()?).await?;
        let (server, _) = listener.accept().await?;
        let (read, _write) = Conn::Tcp(server).into_split();
        Ok((client, read))
    }

    #[tokio::test]
    async fn identifies_by_magic_even_when_split() -> std::io::Result<()> {
        let (mut client, mut read) = pair().await?;
        client.write_all(b"QE").await?;
        let reading =
            tokio::spawn(async move { read_first_bytes(&mut read, Duration::from_secs(5)).await });
        client.write_all(b"VM\0\0\0\x03").await?;
        let got = reading.await.map_err(std::io::Error::other)?;
        assert_eq!(got, FirstBytes::Identified(ChannelKind::Main, *b"QEVM"));

        let (mut client, mut read) = pair().await?;
        client.write_all(&MULTIFD_MAGIC).await?;
        assert_eq!(
            read_first_bytes(&mut read, Duration::from_secs(5)).await,
            FirstBytes::Identified(ChannelKind::Multifd, MULTIFD_MAGIC)
        );
        Ok(())
    }

    #[tokio::test]
    async fn silent_garbage_and_closed() -> std::io::Result<()> {
        let (mut client, mut read) = pair().await?;
        client.write_all(b"G").await?;
        assert_eq!(
            read_first_bytes(&mut read, Duration::from_millis(50)).await,
            FirstBytes::Silent(b"G".to_vec())
        );
        let (mut client, mut read) = pair().await?;
        client.write_all(b"GET / HTTP/1.0\r\n").await?;
        assert_eq!(
            read_first_bytes(&mut read, Duration::from_secs(5)).await,
            FirstBytes::Unknown(*b"GET ")
        );
        let (client, mut read) = pair().await?;
        drop(client);
        assert_eq!(
            read_first_bytes(&mut read, Duration::from_secs(5)).await,
            FirstBytes::Closed(Vec::new())
        );
        Ok(())
    }
}
