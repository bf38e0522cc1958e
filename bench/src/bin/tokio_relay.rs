#![forbid(unsafe_code)]
//! The baseline a user would write in ten minutes: accept, dial the destination, copy
//! both directions with 1 MiB buffers (`copy_bidirectional_with_sizes`), nothing else.
//! migproxy does strictly more work per byte; the benchmark shows what that costs.

use clap::Parser;
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Parser)]
#[command(
    name = "tokio-relay",
    about = "Minimal tokio TCP relay (benchmark baseline)"
)]
struct Args {
    /// Address to listen on, e.g. 127.0.0.1:4444.
    #[arg(long)]
    listen: String,
    /// Address to forward each connection to.
    #[arg(long)]
    upstream: String,
    /// Copy buffer per direction, bytes.
    #[arg(long, default_value_t = 1024 * 1024)]
    buffer_size: usize,
}

async fn relay(
    mut downstream: TcpStream,
    upstream: String,
    buffer_size: usize,
) -> std::io::Result<()> {
    let mut upstream = TcpStream::connect(upstream).await?;
    // Small control records (the device-state tail) should not wait for Nagle.
    downstream.set_nodelay(true)?;
    upstream.set_nodelay(true)?;
    tokio::io::copy_bidirectional_with_sizes(
        &mut downstream,
        &mut upstream,
        buffer_size,
        buffer_size,
    )
    .await?;
    Ok(())
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let listener = TcpListener::bind(&args.listen).await?;
    loop {
        let (downstream, peer) = listener.accept().await?;
        let upstream = args.upstream.clone();
        let buffer_size = args.buffer_size;
        tokio::spawn(async move {
            if let Err(e) = relay(downstream, upstream, buffer_size).await {
                eprintln!("tokio-relay: {peer}: {e}");
            }
        });
    }
}
