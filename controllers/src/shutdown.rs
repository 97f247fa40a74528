//! SIGTERM and Ctrl-C for the agent and the operator.
//!
//! Once a process listens for a signal through tokio, the signal no longer
//! ends it by default; a signal that arrives while no listener is waiting is
//! then simply gone. A listener created afresh in each `select!` (as a loop
//! that sleeps between passes would) therefore misses a signal sent while a
//! pass runs, and the process never stops. [`Shutdown`] registers both
//! signals once, when it is built, and remembers that one came.

use std::io;

/// Listens for SIGTERM and SIGINT from the moment it is built.
pub struct Shutdown {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    asked: bool,
}

impl Shutdown {
    /// Registers the handlers now; needs a running tokio runtime.
    pub fn listen() -> io::Result<Shutdown> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Shutdown {
                term: signal(SignalKind::terminate())?,
                interrupt: signal(SignalKind::interrupt())?,
                asked: false,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(Shutdown { asked: false })
        }
    }

    /// Resolves once SIGTERM or SIGINT has come, at once if one came before
    /// (even while nothing was waiting). Cancel-safe: a `select!` may drop it.
    pub async fn wait(&mut self) {
        if self.asked {
            return;
        }
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.interrupt.recv() => {}
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        self.asked = true;
    }

    /// Whether a signal has come (without waiting).
    pub fn asked(&mut self) -> bool {
        if self.asked {
            return true;
        }
        #[cfg(unix)]
        {
            use std::task::{Context, Poll};
            let mut cx = Context::from_waker(std::task::Waker::noop());
            if matches!(self.term.poll_recv(&mut cx), Poll::Ready(_))
                || matches!(self.interrupt.poll_recv(&mut cx), Poll::Ready(_))
            {
                self.asked = true;
            }
        }
        self.asked
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    /// A signal that arrives while nobody waits is still seen by the next
    /// wait: the race that kept an agent running after Ctrl-C.
    #[tokio::test]
    async fn a_signal_sent_while_busy_is_not_lost() {
        let mut shutdown = Shutdown::listen().expect("signal handlers");
        assert!(!shutdown.asked());
        // SAFETY: raise() sends a signal to this process; the handler tokio
        // installed for SIGTERM above only records it.
        assert_eq!(unsafe { libc::raise(libc::SIGTERM) }, 0);
        // Busy elsewhere for a moment, not waiting on `shutdown`.
        std::thread::sleep(std::time::Duration::from_millis(50));
        tokio::time::timeout(std::time::Duration::from_secs(5), shutdown.wait())
            .await
            .expect("the SIGTERM sent before the wait is seen");
        assert!(shutdown.asked());
        // And once seen, every later wait returns at once.
        tokio::time::timeout(std::time::Duration::from_millis(100), shutdown.wait())
            .await
            .expect("a second wait returns at once");
    }
}
