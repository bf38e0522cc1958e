//! Writes with a stall deadline. Backpressure is how migproxy bounds memory (a slow peer slows
//! the other side instead of filling buffers), but a peer that stops reading altogether would then
//! hold the other side, and the migration's slot, forever. Each write must make progress within
//! the deadline (`--write-stall-timeout`): a slow peer that takes a byte now and then is waited
//! for, a peer that takes nothing for that long is given up on.

use std::future::Future;
use std::io;
use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::error::{Abort, ProxyError};

/// Await one write-side operation (`what` names it for the error): its I/O error, or a stall when
/// it did not finish within `stall`.
pub async fn progress<T>(
    stall: Duration,
    what: &str,
    operation: impl Future<Output = io::Result<T>>,
) -> Result<T, ProxyError> {
    match tokio::time::timeout(stall, operation).await {
        Ok(result) => result.map_err(|e| ProxyError::io(what, e)),
        Err(_) => Err(ProxyError::Aborted(Abort::WriteStalled {
            what: what.to_owned(),
            waited: stall,
        })),
    }
}

/// `write_all`, where every partial write must come within `stall` of the previous one.
pub async fn write_all<W: AsyncWrite + Unpin>(
    writer: &mut W,
    mut bytes: &[u8],
    stall: Duration,
    what: &str,
) -> Result<(), ProxyError> {
    while !bytes.is_empty() {
        let written = progress(stall, what, writer.write(bytes)).await?;
        if written == 0 {
            return Err(ProxyError::io(what, io::ErrorKind::WriteZero.into()));
        }
        bytes = bytes.get(written..).unwrap_or_default();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_reader_that_never_reads_stalls_the_write_at_the_deadline() {
        // An 8-byte pipe nobody reads: the first write fills it, the second can never finish.
        let (mut writer, _reader) = tokio::io::duplex(8);
        let result = write_all(
            &mut writer,
            b"0123456789abcdef",
            Duration::from_millis(50),
            "test: write",
        )
        .await;
        match result {
            Err(ProxyError::Aborted(Abort::WriteStalled { what, waited })) => {
                assert_eq!(what, "test: write");
                assert_eq!(waited, Duration::from_millis(50));
            }
            other => panic!("expected a stall, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_slow_reader_that_keeps_reading_is_waited_for(
    ) -> Result<(), Box<dyn std::error::Error>> {
        use tokio::io::AsyncReadExt;
        // Every byte is taken within the deadline, the whole takes longer than one deadline.
        let (mut writer, mut reader) = tokio::io::duplex(1);
        let reading = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut byte = [0u8; 1];
            while reader.read(&mut byte).await? == 1 {
                got.push(byte[0]);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok::<_, io::Error>(got)
        });
        write_all(&mut writer, b"0123456789", Duration::from_secs(5), "w").await?;
        drop(writer);
        assert_eq!(reading.await??, b"0123456789");
        Ok(())
    }
}
