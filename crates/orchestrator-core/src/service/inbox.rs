//! The command queue of one service's actor: many senders (the cloned
//! handles), one receiver (the actor).
//!
//! tokio's mpsc channel would do, but it allocates a 32-slot block and a
//! cache-padded channel, about 1 KiB, for each of possibly thousands of
//! services that receive a command or two in their life. This holds an empty
//! queue (no allocation) and a `Notify`, a tenth of that.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;

struct Shared<T> {
    /// `None` once the receiver is gone: sends fail from then on.
    queue: Mutex<Option<VecDeque<T>>>,
    /// Wakes the receiver; a notification sent while it is not waiting is
    /// kept as a permit, so none is lost between its check and its wait.
    wake: Notify,
    senders: AtomicUsize,
}

pub(crate) struct Sender<T> {
    shared: Arc<Shared<T>>,
}

pub(crate) struct Receiver<T> {
    shared: Arc<Shared<T>>,
}

pub(crate) fn inbox<T>() -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        queue: Mutex::new(Some(VecDeque::new())),
        wake: Notify::new(),
        senders: AtomicUsize::new(1),
    });
    (
        Sender {
            shared: Arc::clone(&shared),
        },
        Receiver { shared },
    )
}

impl<T> Sender<T> {
    /// Queues `message`, or hands it back when the receiver is gone.
    pub(crate) fn send(&self, message: T) -> Result<(), T> {
        {
            let mut queue = self
                .shared
                .queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            match queue.as_mut() {
                Some(queue) => queue.push_back(message),
                None => return Err(message),
            }
        }
        self.shared.wake.notify_one();
        Ok(())
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::Relaxed);
        Sender {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        // AcqRel: the receiver that sees zero must also see every message
        // this sender queued before it went.
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.wake.notify_one();
        }
    }
}

impl<T> Receiver<T> {
    /// The next message, or `None` once every sender is gone and the queue
    /// is empty.
    pub(crate) async fn recv(&self) -> Option<T> {
        loop {
            if let Some(message) = self.try_recv() {
                return Some(message);
            }
            if self.shared.senders.load(Ordering::Acquire) == 0 {
                // A last message may have been queued just before the last
                // sender went.
                return self.try_recv();
            }
            self.shared.wake.notified().await;
        }
    }

    fn try_recv(&self) -> Option<T> {
        self.shared
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_mut()
            .and_then(VecDeque::pop_front)
    }
}

impl<T> Drop for Receiver<T> {
    /// Later sends fail, and what was queued is dropped here (so a reply
    /// channel inside tells its waiter that nobody will answer).
    fn drop(&mut self) {
        let queued = self
            .shared
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        drop(queued);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn messages_arrive_in_order_from_every_sender() {
        let (first, receiver) = inbox();
        let second = first.clone();
        first.send(1).unwrap();
        second.send(2).unwrap();
        first.send(3).unwrap();
        assert_eq!(receiver.recv().await, Some(1));
        assert_eq!(receiver.recv().await, Some(2));
        assert_eq!(receiver.recv().await, Some(3));
    }

    #[tokio::test]
    async fn a_waiting_receiver_is_woken_by_a_send() {
        let (sender, receiver) = inbox();
        let waiting = tokio::spawn(async move { receiver.recv().await });
        tokio::task::yield_now().await;
        sender.send("go").unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("woken")
            .unwrap();
        assert_eq!(got, Some("go"));
    }

    #[tokio::test]
    async fn the_receiver_sees_the_end_after_the_last_message() {
        let (sender, receiver) = inbox();
        let clone = sender.clone();
        sender.send(7).unwrap();
        drop(sender);
        let waiting = tokio::spawn(async move {
            let first = receiver.recv().await;
            let end = receiver.recv().await;
            (first, end)
        });
        tokio::task::yield_now().await;
        drop(clone);
        let got = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("woken by the last sender going")
            .unwrap();
        assert_eq!(got, (Some(7), None));
    }

    #[tokio::test]
    async fn sends_fail_once_the_receiver_is_gone_and_queued_ones_are_dropped() {
        let (sender, receiver) = inbox();
        let (reply, answer) = tokio::sync::oneshot::channel::<()>();
        sender.send(reply).unwrap();
        drop(receiver);
        assert!(answer.await.is_err(), "the queued reply was dropped");
        let (reply, _answer) = tokio::sync::oneshot::channel::<()>();
        assert!(sender.send(reply).is_err());
    }
}
