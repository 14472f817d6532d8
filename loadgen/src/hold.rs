//! Held connections: opens N loopback connections (N client and N accepted
//! sockets), reports when all are established, and keeps them until stdin
//! reaches EOF or the time bound passes.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, TcpListener, TcpStream},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use serde_json::json;

#[derive(clap::Args)]
pub struct Args {
    /// Connections to open (each is two sockets on this host).
    #[arg(long)]
    pub connections: usize,
    /// Hold them at most this long, in seconds, if stdin stays open.
    #[arg(long, default_value_t = 600)]
    pub max_seconds: u64,
}

/// Connections per listening port: well below the ephemeral port range
/// (28,232 ports by default), which bounds connections to one address.
const PER_LISTENER: usize = 20_000;

pub fn run(args: &Args) -> Result<String> {
    anyhow::ensure!(
        (1..=400_000).contains(&args.connections),
        "--connections must be 1-400000"
    );
    loadgen::raise_nofile(2 * args.connections as u64 + 256)?;
    let start = Instant::now();
    let listeners = (0..args.connections.div_ceil(PER_LISTENER))
        .map(|_| {
            let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("bind")?;
            let port = l.local_addr()?.port();
            Ok((l, port))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut held = Vec::with_capacity(2 * args.connections);
    for i in 0..args.connections {
        let (listener, port) = &listeners[i % listeners.len()];
        let client = TcpStream::connect((Ipv4Addr::LOCALHOST, *port))
            .with_context(|| format!("connection {i} of {}", args.connections))?;
        let (server, _) = listener.accept().context("accept")?;
        held.push(client);
        held.push(server);
    }
    let ready = json!({
        "mode": "hold",
        "connections": args.connections,
        "sockets": held.len(),
        "ports": listeners.iter().map(|(_, p)| *p).collect::<Vec<_>>(),
        "open_seconds": start.elapsed().as_secs_f64(),
    });
    let mut out = std::io::stdout();
    writeln!(out, "{ready}")?;
    out.flush()?;

    // Until stdin closes (the bench is done measuring) or the bound passes.
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        let _ = tx.send(());
    });
    let _ = rx.recv_timeout(Duration::from_secs(args.max_seconds));
    drop(held);
    Ok(json!({ "mode": "hold", "released": args.connections }).to_string())
}
