//! Scrapes answered by the thread that owns the state: colo-proxy's single-threaded event loops
//! keep the engine to themselves, so the metrics server's thread asks the loop (a message and
//! a wake-up) and waits a bounded time for its snapshot. Nothing is copied when nobody scrapes.

use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use mio::Waker;

/// How long a scrape waits for the loop.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// Scrapes waiting for the loop at once (the server asks one at a time; a late answer's slot
/// frees when the loop gets to it).
const PENDING: usize = 4;

/// The loop's side: scrapes to answer when its waker fires.
pub struct ScrapeRequests<T> {
    rx: Receiver<SyncSender<T>>,
}

impl<T> ScrapeRequests<T> {
    /// Answers every waiting scrape with a fresh `snapshot`.
    pub fn answer(&self, mut snapshot: impl FnMut() -> T) {
        while let Ok(reply) = self.rx.try_recv() {
            // The scrape may have given up waiting; then nobody wants this one.
            let _ = reply.try_send(snapshot());
        }
    }
}

/// A pair: the function the metrics server calls (it wakes the loop through `waker` and waits
/// at most `timeout` for the answer) and the loop's [`ScrapeRequests`].
pub fn relay<T: Send + 'static>(
    waker: Arc<Waker>,
    timeout: Duration,
) -> (impl FnMut() -> Result<T, String> + Send + 'static, ScrapeRequests<T>) {
    let (tx, rx) = mpsc::sync_channel::<SyncSender<T>>(PENDING);
    let ask = move || {
        let (reply_tx, reply_rx) = mpsc::sync_channel(1);
        match tx.try_send(reply_tx) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err("the event loop has not answered earlier scrapes yet".into()),
            Err(TrySendError::Disconnected(_)) => return Err("the event loop has stopped".into()),
        }
        waker.wake().map_err(|e| format!("cannot wake the event loop: {e}"))?;
        reply_rx.recv_timeout(timeout).map_err(|_| format!("the event loop did not answer within {timeout:?}"))
    };
    (ask, ScrapeRequests { rx })
}

#[cfg(test)]
mod tests {
    use mio::{Events, Poll, Token};

    use super::*;

    #[test]
    fn the_loop_answers_when_woken_and_a_silent_loop_times_out() {
        let mut poll = Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), Token(7)).unwrap());
        let (mut ask, requests) = relay::<u64>(waker, Duration::from_millis(200));
        let looper = std::thread::spawn(move || {
            let mut events = Events::with_capacity(4);
            let mut n = 0;
            while n < 2 {
                poll.poll(&mut events, None).unwrap();
                if events.iter().any(|e| e.token() == Token(7)) {
                    n += 1;
                    requests.answer(|| 40 + n);
                }
            }
            requests
        });
        assert_eq!(ask(), Ok(41));
        assert_eq!(ask(), Ok(42));
        // The loop no longer answers (it keeps the receiver but does not look).
        let requests = looper.join().unwrap();
        let e = ask().unwrap_err();
        assert!(e.contains("did not answer"), "{e}");
        drop(requests);
        let e = ask().unwrap_err();
        assert!(e.contains("stopped"), "{e}");
    }
}
