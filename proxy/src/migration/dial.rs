//! Dialing the destination for each channel of one migration, in the order it must see them.
//!
//! The destination takes the first connection (with TLS: the first completed handshake) as the
//! main channel on QEMU 7.2, and on 10.0 with TLS or postcopy, so every other channel waits until
//! the main channel is connected, and connects happen one at a time (multifd order among
//! themselves is irrelevant: the channel id in their handshake decides). Nothing is dialed for a
//! connection that has not identified itself: see `connection.rs`.

use std::time::Duration;

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
    /// given), after the main channel; the connect and handshake together must take at most
    /// `deadline` (a destination that never answers must not hold the source and the turn).
    /// `towards_link`: migproxy runs on the source host, so this socket is the one towards the
    /// slow leg (`Conn::tune_as_link_towards_destination`).
    pub async fn dial(
        &self,
        kind: ChannelKind,
        upstream: &Address,
        tls: Option<&ListenerTls>,
        deadline: Duration,
        towards_link: bool,
    ) -> Result<Conn, ProxyError> {
        if kind != ChannelKind::Main {
            let mut dialed = self.main_dialed.subscribe();
            dialed
                .wait_for(|dialed| *dialed)
                .await
                .map_err(|_| ProxyError::Aborted(Abort::MainChannelGone))?;
        }
        let _turn = self.one_at_a_time.lock().await;
        let connect = async {
            let conn = dial(upstream, towards_link).await?;
            match tls {
                // Handshake inside the turn: the destination orders channels by completed
                // handshake.
                Some(tls) => tls.connect(conn, upstream).await,
                None => Ok(conn),
            }
        };
        let conn = tokio::time::timeout(deadline, connect)
            .await
            .map_err(|_| {
                ProxyError::Aborted(Abort::DialTimeout {
                    upstream: upstream.to_string(),
                    waited: deadline,
                })
            })??;
        if kind == ChannelKind::Main {
            self.main_dialed.send_replace(true);
        }
        Ok(conn)
    }
}
