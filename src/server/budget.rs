//! How many request bytes one connection may hold in memory at once.
//!
//! HTTP/2 flow control bounds what a client may send before keygate *reads* it, but tonic reads
//! a request as it arrives and buffers it until the message is complete, giving the window back
//! as it goes: without a bound of its own, one connection could pin its streams times the
//! largest message (128 × 4 MiB). So every request body is counted against its connection's
//! budget ([`CONNECTION_BUDGET_BYTES`]) while the message it carries is incomplete and while the
//! call is being handled. When the budget is spent, the connection's other bodies are not read
//! on (so HTTP/2 flow control stops their senders) until calls finish; a call that holds every
//! counted byte itself may always go on, so one large message (an ImportKeys of 4 MiB from an
//! admin) still passes. A stalled call ends at its deadline like any other.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use http_body::{Body, Frame};

use crate::grpc::framing::{Framing, Piece};

/// Request bytes one connection may hold at once, beyond one call that holds them all.
pub const CONNECTION_BUDGET_BYTES: usize = 1024 * 1024;

/// The request bytes a connection holds; see the module documentation.
#[derive(Debug)]
pub struct ConnectionBudget {
    limit: usize,
    used: AtomicUsize,
    waiting: Mutex<Vec<Waker>>,
}

impl ConnectionBudget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self { limit, used: AtomicUsize::new(0), waiting: Mutex::default() })
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// Whether a call holding `holding` bytes may read on.
    fn may_read(&self, holding: usize) -> bool {
        let used = self.used();
        used < self.limit || used <= holding
    }

    fn release(&self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        self.used.fetch_sub(bytes, Ordering::AcqRel);
        let waiting = std::mem::take(&mut *self.waiting.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
        waiting.into_iter().for_each(Waker::wake);
    }

    fn wait(&self, waker: &Waker) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if !waiting.iter().any(|waiting| waiting.will_wake(waker)) {
            waiting.push(waker.clone());
        }
    }
}

/// The bytes one call holds of its connection's budget: given back when both its request body
/// and its response future are done with.
#[derive(Debug)]
pub struct CallCharge {
    budget: Arc<ConnectionBudget>,
    held: AtomicUsize,
}

impl CallCharge {
    pub fn new(budget: Arc<ConnectionBudget>) -> Arc<Self> {
        Arc::new(Self { budget, held: AtomicUsize::new(0) })
    }

    fn take(&self, bytes: usize) {
        self.held.fetch_add(bytes, Ordering::AcqRel);
        self.budget.used.fetch_add(bytes, Ordering::AcqRel);
    }

    fn give_back(&self, bytes: usize) {
        self.held.fetch_sub(bytes, Ordering::AcqRel);
        self.budget.release(bytes);
    }
}

impl Drop for CallCharge {
    fn drop(&mut self) {
        self.budget.release(*self.held.get_mut());
    }
}

pin_project_lite::pin_project! {
    /// A request body counted against its connection's budget: `in_progress` bytes of the
    /// message in progress, and `complete` bytes of complete messages, held until the next
    /// message begins (for a unary call: until the call is handled).
    pub struct BudgetedBody<B> {
        #[pin]
        inner: B,
        charge: Arc<CallCharge>,
        framing: Framing,
        in_progress: usize,
        complete: usize,
    }
}

impl<B> BudgetedBody<B> {
    pub fn new(inner: B, charge: Arc<CallCharge>) -> Self {
        Self { inner, charge, framing: Framing::default(), in_progress: 0, complete: 0 }
    }
}

impl<B> Body for BudgetedBody<B>
where
    B: Body<Data = bytes::Bytes>,
{
    type Data = bytes::Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let budget = &this.charge.budget;
        let held = || this.charge.held.load(Ordering::Acquire);
        if !budget.may_read(held()) {
            budget.wait(context.waker());
            // Released between the check and the registration: read on.
            if !budget.may_read(held()) {
                return Poll::Pending;
            }
        }
        let frame = std::task::ready!(this.inner.poll_frame(context));
        if let Some(Ok(frame)) = &frame
            && let Some(data) = frame.data_ref()
        {
            let (charge, in_progress, complete) = (&*this.charge, this.in_progress, this.complete);
            this.framing.split(data, |piece| match piece {
                Piece::Bytes(bytes) => {
                    if *in_progress == 0 && *complete > 0 {
                        // A new message begins: the ones before it have been handed over.
                        charge.give_back(std::mem::take(complete));
                    }
                    charge.take(bytes.len());
                    *in_progress += bytes.len();
                }
                Piece::End => *complete += std::mem::take(in_progress),
            });
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use http_body_util::BodyExt;

    use super::*;

    /// A body of ready chunks.
    struct Chunks(VecDeque<bytes::Bytes>);

    impl Body for Chunks {
        type Data = bytes::Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
            Poll::Ready(self.get_mut().0.pop_front().map(|chunk| Ok(Frame::data(chunk))))
        }
    }

    fn message(payload_bytes: usize) -> bytes::Bytes {
        let mut framed = vec![0u8];
        framed.extend_from_slice(&(payload_bytes as u32).to_be_bytes());
        framed.resize(5 + payload_bytes, 7);
        framed.into()
    }

    fn body(chunks: Vec<bytes::Bytes>, charge: Arc<CallCharge>) -> BudgetedBody<Chunks> {
        BudgetedBody::new(Chunks(chunks.into()), charge)
    }

    #[tokio::test]
    async fn a_call_holds_its_message_until_it_is_done_and_others_wait_for_the_budget() {
        let budget = ConnectionBudget::new(1000);
        let first = CallCharge::new(budget.clone());
        let mut large = body(vec![message(1500)], first.clone());
        large.frame().await.unwrap().unwrap();
        assert_eq!(budget.used(), 1505, "a call that holds every byte may go beyond the budget");
        drop(large);
        assert_eq!(budget.used(), 1505, "the call is still being handled");

        let second = CallCharge::new(budget.clone());
        let mut waiting = body(vec![message(10)], second.clone());
        let read = tokio::time::timeout(std::time::Duration::from_millis(50), waiting.frame()).await;
        assert!(read.is_err(), "the budget is spent: the second call is not read on");
        drop(first);
        assert_eq!(budget.used(), 0);
        waiting.frame().await.unwrap().unwrap();
        assert_eq!(budget.used(), 15);
        drop((waiting, second));
        assert_eq!(budget.used(), 0, "every byte is given back");
    }

    #[tokio::test]
    async fn a_stream_of_messages_holds_only_the_latest() {
        let budget = ConnectionBudget::new(1000);
        let charge = CallCharge::new(budget.clone());
        let mut stream = body(vec![message(600), message(600), message(600)], charge.clone());
        while let Some(frame) = stream.frame().await {
            frame.unwrap();
            assert!(budget.used() <= 605, "held {}", budget.used());
        }
        drop((stream, charge));
        assert_eq!(budget.used(), 0);
    }
}
