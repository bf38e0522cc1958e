//! Dialing the destination for each channel of one migration, in the order it must see them.
//!
//! The destination takes the first connection (with TLS: the first completed handshake) as the
//! main channel on QEMU 7.2, and on 10.0 with TLS or postcopy, so every other channel waits until
//! the main channel is connected, and connects happen one at a time (multifd order among
//! themselves is irrelevant: the channel id in their handshake decides). Nothing is dialed for a
//! connection that has not identified itself: see `connection.rs`.

use tokio::sync::{watch, Mutex};

use crate::error::{Abort, ProxyError};
use crate::migration::identify::ChannelKind;
use crate::net::addr::Address;
use crate::net::conn::{dial, Conn};
use crate::net::tls::ListenerTls;

/// The dial sequence of one migration.
#[derive(Debug)]
pub struct DialOrder {
    main_dialed: watch::Sender<bool>,
    /// Serialises upstream connects, so the destination accepts them in our order.
    one_at_a_time: Mutex<()>,
}

impl Default for DialOrder {
    fn default() -> Self {
        DialOrder {
            main_dialed: watch::channel(false).0,
            one_at_a_time: Mutex::new(()),
        }
    }
}

impl DialOrder {
    /// Connect to `upstream` for one channel (and complete the TLS handshake, when `tls` is
    /// given), after the main channel.
    pub async fn dial(
        &self,
        kind: ChannelKind,
        upstream: &Address,
        tls: Option<&ListenerTls>,
    ) -> Result<Conn, ProxyError> {
        if kind != ChannelKind::Main {
            let mut dialed = self.main_dialed.subscribe();
            dialed
                .wait_for(|dialed| *dialed)
                .await
                .map_err(|_| ProxyError::Aborted(Abort::MainChannelGone))?;
        }
        let _turn = self.one_at_a_time.lock().await;
        let mut conn = dial(upstream).await?;
        if let Some(tls) = tls {
            // Handshake inside the turn: the destination orders channels by completed handshake.
            conn = tls.connect(conn, upstream).await?;
        }
        if kind == ChannelKind::Main {
            self.main_dialed.send_replace(true);
        }
        Ok(conn)
    }
}
