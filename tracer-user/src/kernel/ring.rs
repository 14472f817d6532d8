//! The event ring buffer, read one way by `trace`, `run` and `selftest`:
//! every record waiting is taken and decoded, in order, under one borrow;
//! what to do with each (and with an undecodable one) is the caller's.

use std::{
    io,
    os::fd::{AsRawFd, RawFd},
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use tokio::io::{Interest, unix::AsyncFd};

use crate::event::{ConnEvent, DecodeError, decode};

/// The kernel programs' event ring buffer.
pub(crate) struct EventRing(RingBuf<MapData>);

impl EventRing {
    pub(super) fn new(rb: RingBuf<MapData>) -> Self {
        Self(rb)
    }

    /// Hands every record waiting now to `f`, decoded.
    pub(crate) fn drain(&mut self, mut f: impl FnMut(Result<ConnEvent, DecodeError>)) {
        while let Some(item) = self.0.next() {
            f(decode(&item));
        }
    }

    /// Blocks until records wait or `timeout` passes (for a thread without
    /// an async runtime).
    pub(crate) fn wait(&self, timeout: Duration) {
        let mut pfd = libc::pollfd {
            fd: self.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd; the result only says whether to drain.
        unsafe { libc::poll(&raw mut pfd, 1, ms) };
    }

    /// Registers the ring with tokio, to be drained when the kernel writes.
    pub(crate) fn into_async(self) -> io::Result<AsyncRing> {
        readable(self).map(AsyncRing)
    }
}

impl AsRawFd for EventRing {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// The event ring, registered with tokio.
pub(crate) struct AsyncRing(AsyncFd<EventRing>);

impl AsyncRing {
    /// Waits until the kernel has written records, then gives `f` the ring
    /// to drain.
    pub(crate) async fn when_ready<R>(
        &mut self,
        f: impl FnOnce(&mut EventRing) -> R,
    ) -> io::Result<R> {
        let mut guard = self.0.readable_mut().await?;
        let out = f(guard.get_inner_mut());
        guard.clear_ready();
        Ok(out)
    }

    /// The ring, to drain what waits now without waiting.
    pub(crate) fn get_mut(&mut self) -> &mut EventRing {
        self.0.get_mut()
    }
}

/// The kernel programs' log (aya-log), forwarded to `log` as it fills.
pub(crate) struct KernelLog(Option<AsyncFd<aya_log::EbpfLogger<&'static dyn log::Log>>>);

impl KernelLog {
    pub(super) fn new(
        logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    ) -> io::Result<Self> {
        logger.map(readable).transpose().map(Self)
    }

    /// Forwards the log's records once it has some; never completes when
    /// the kernel side has no log.
    pub(crate) async fn flush_when_ready(&mut self) -> io::Result<()> {
        let Some(fd) = &mut self.0 else {
            return std::future::pending().await;
        };
        let mut guard = fd.readable_mut().await?;
        guard.get_inner_mut().flush();
        guard.clear_ready();
        Ok(())
    }
}

/// Registers a ring buffer's fd with tokio for readability.
fn readable<T: AsRawFd>(inner: T) -> io::Result<AsyncFd<T>> {
    // SAFETY: aya's RingBuf (and the log ring it wraps) owns its map fd and
    // keeps it open, unchanged, until dropped, which happens only after the
    // AsyncFd that owns it is dropped.
    unsafe { AsyncFd::register_with_interest(inner, Interest::READABLE) }.map_err(io::Error::from)
}
