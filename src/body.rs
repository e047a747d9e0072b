//! Response bodies: tollgate's own (errors, filtered lists) and the upstream's, passed through
//! frame by frame while a [`Meter`] looks at each frame on the side.
//!
//! Invariant: a metered body never holds more than one partial SSE event (see
//! `UsageChunkFilter`) and forwards every frame as soon as it arrives; its settlement runs
//! exactly once, when the upstream's body ends, fails or stalls, or when the client goes away.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::usage::{Meter, Report, UsageChunkFilter};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How a metered body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The upstream sent its whole body.
    Complete,
    /// The upstream failed or stalled, or the client went away, before the end.
    Cut,
}

/// Called once when a metered body ends.
pub trait Settle: Send + 'static {
    fn settle(self: Box<Self>, report: Report, ending: Ending);
}

/// Idle timeout between two frames of an upstream body.
#[derive(Debug, thiserror::Error)]
#[error("the upstream sent nothing for {0:?}")]
pub struct IdleTimeout(Duration);

pin_project_lite::pin_project! {
    #[project = ProxyBodyProj]
    pub enum ProxyBody {
        Full { data: Option<Bytes> },
        Upstream {
            #[pin]
            inner: Incoming,
            watch: Box<Watch>,
        },
    }
}

/// What an upstream body carries besides the bytes: the idle timer and, when the response
/// is metered, the meter, the filter and the settlement.
pub struct Watch {
    idle: Duration,
    /// Fires `idle` after the last frame, or earlier: it is re-armed lazily, only when it
    /// fires, not on every frame (a reset takes the timer wheel's lock).
    sleep: Pin<Box<Sleep>>,
    last_frame: Instant,
    meter: Option<Meter>,
    filter: Option<UsageChunkFilter>,
    settle: Option<Box<dyn Settle>>,
    ended: bool,
}

impl Watch {
    fn finish(&mut self, ending: Ending) {
        if let Some(settle) = self.settle.take() {
            let report = match (&self.meter, &self.filter) {
                (Some(meter), _) => meter.report(),
                // A filtered stream is metered by its filter's scanner.
                (None, Some(filter)) => filter.report(),
                (None, None) => Report::default(),
            };
            settle.settle(report, ending);
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        // The client went away (or the connection died) before the body ended.
        let ending = if self.ended {
            Ending::Complete
        } else {
            Ending::Cut
        };
        self.finish(ending);
    }
}

impl ProxyBody {
    pub fn full(data: impl Into<Bytes>) -> Self {
        let data = data.into();
        ProxyBody::Full {
            data: (!data.is_empty()).then_some(data),
        }
    }

    pub fn empty() -> Self {
        ProxyBody::Full { data: None }
    }

    /// The upstream's body, with an idle timeout and optional metering.
    pub fn upstream(
        inner: Incoming,
        idle: Duration,
        meter: Option<Meter>,
        filter: Option<UsageChunkFilter>,
        settle: Option<Box<dyn Settle>>,
    ) -> Self {
        let now = Instant::now();
        ProxyBody::Upstream {
            inner,
            watch: Box::new(Watch {
                idle,
                sleep: Box::pin(tokio::time::sleep_until(now + idle)),
                last_frame: now,
                meter,
                filter,
                settle,
                ended: false,
            }),
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            ProxyBodyProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ProxyBodyProj::Upstream { mut inner, watch } => loop {
                if watch.ended {
                    return Poll::Ready(None);
                }
                let polled = inner.as_mut().poll_frame(cx);
                let frame = match polled {
                    Poll::Pending => {
                        while watch.sleep.as_mut().poll(cx).is_ready() {
                            let deadline = watch.last_frame + watch.idle;
                            if deadline > Instant::now() {
                                // Frames came since it was armed: wait for the rest of the
                                // idle time after the last one (polling again registers it).
                                watch.sleep.as_mut().reset(deadline);
                                continue;
                            }
                            watch.ended = true;
                            watch.finish(Ending::Cut);
                            return Poll::Ready(Some(Err(Box::new(IdleTimeout(watch.idle)))));
                        }
                        return Poll::Pending;
                    }
                    Poll::Ready(frame) => frame,
                };
                watch.last_frame = Instant::now();
                match frame {
                    None => {
                        watch.ended = true;
                        let tail = watch.filter.as_mut().map(UsageChunkFilter::finish);
                        watch.finish(Ending::Complete);
                        return match tail {
                            Some(tail) if !tail.is_empty() => {
                                Poll::Ready(Some(Ok(Frame::data(tail))))
                            }
                            _ => Poll::Ready(None),
                        };
                    }
                    Some(Err(err)) => {
                        watch.ended = true;
                        watch.finish(Ending::Cut);
                        return Poll::Ready(Some(Err(Box::new(err))));
                    }
                    Some(Ok(frame)) => {
                        let frame = match frame.into_data() {
                            Ok(data) => data,
                            // Trailers pass through untouched.
                            Err(frame) => return Poll::Ready(Some(Ok(frame))),
                        };
                        if let Some(meter) = watch.meter.as_mut() {
                            meter.observe(&frame);
                        }
                        let mut out = match watch.filter.as_mut() {
                            Some(filter) => filter.push(&frame),
                            None => frame,
                        };
                        if inner.is_end_stream() {
                            // A body of known length ends with its last byte: hyper may not
                            // poll again, so settle it as complete now.
                            watch.ended = true;
                            if let Some(filter) = watch.filter.as_mut() {
                                let tail = filter.finish();
                                if !tail.is_empty() {
                                    let mut joined = bytes::BytesMut::from(&out[..]);
                                    joined.extend_from_slice(&tail);
                                    out = joined.freeze();
                                }
                            }
                            watch.finish(Ending::Complete);
                            if out.is_empty() {
                                return Poll::Ready(None);
                            }
                        }
                        if out.is_empty() {
                            // The filter held the bytes back; read on rather than send nothing.
                            continue;
                        }
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full { data } => data.is_none(),
            // Not the inner body's answer: hyper must poll once more so the end is seen and
            // settled as complete rather than dropped as cut.
            ProxyBody::Upstream { watch, .. } => watch.ended,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ProxyBody::Upstream { inner, watch } => {
                if watch.filter.is_some() {
                    SizeHint::default()
                } else {
                    inner.size_hint()
                }
            }
        }
    }
}
