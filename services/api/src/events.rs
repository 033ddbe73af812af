//! Job events for SSE clients: one Postgres LISTEN connection per process, fanned out to every
//! client through a broadcast channel.
//!
//! A notification only says "job X has new events"; each client then reads the events after the
//! last id it sent from `job_events`. So a missed or coalesced notification costs latency, never
//! an event: after the listener (re)connects it broadcasts [`Notice::Resync`], a lagging client
//! resyncs too, and every client also re-reads on a slow poll.

use std::{convert::Infallible, sync::Once, time::Duration};

use axum::response::sse::Event;
use sidbooth_core::{events::EVENTS_CHANNEL, JobStore};
use sidbooth_domain::JobStatus;
use sqlx::{postgres::PgListener, PgPool};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// How often a client re-reads its job's events when no notification arrives.
const POLL_FALLBACK: Duration = Duration::from_secs(5);
/// Capacity of the fan-out channel; a client further behind resyncs from the database.
const BROADCAST_CAPACITY: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Notice {
    /// A job has new events.
    Job(Uuid),
    /// Notifications may have been missed: every client re-reads.
    Resync,
}

pub(crate) struct EventHub {
    pool: PgPool,
    sender: broadcast::Sender<Notice>,
    started: Once,
    shutdown: CancellationToken,
}

impl EventHub {
    pub(crate) fn new(pool: PgPool, shutdown: CancellationToken) -> Self {
        let (sender, _) = broadcast::channel(BROADCAST_CAPACITY);
        Self {
            pool,
            sender,
            started: Once::new(),
            shutdown,
        }
    }

    /// A receiver of notices; starts the process's listener on first use.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Notice> {
        let receiver = self.sender.subscribe();
        self.started.call_once(|| {
            tokio::spawn(listen(
                self.pool.clone(),
                self.sender.clone(),
                self.shutdown.clone(),
            ));
        });
        receiver
    }
}

async fn listen(pool: PgPool, sender: broadcast::Sender<Notice>, shutdown: CancellationToken) {
    loop {
        let connected = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(EVENTS_CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = tokio::select! {
            _ = shutdown.cancelled() => return,
            result = connected => match result {
                Ok(listener) => listener,
                Err(e) => {
                    tracing::warn!(error = %e, "event listener cannot connect; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            },
        };
        let _ = sender.send(Notice::Resync);
        loop {
            let received = tokio::select! {
                _ = shutdown.cancelled() => return,
                received = listener.try_recv() => received,
            };
            match received {
                Ok(Some(notification)) => {
                    if let Ok(job) = notification.payload().parse::<Uuid>() {
                        let _ = sender.send(Notice::Job(job));
                    }
                }
                // The connection dropped; the next try_recv reconnects. Anything sent meanwhile
                // was missed.
                Ok(None) => {
                    let _ = sender.send(Notice::Resync);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "event listener failed; reconnecting");
                    break;
                }
            }
        }
    }
}

pub(crate) type EventSender = mpsc::Sender<Result<Event, Infallible>>;

/// What one SSE client follows.
pub(crate) struct Subscription {
    pub jobs: JobStore,
    pub tenant: Uuid,
    pub job_id: Uuid,
    pub last_id: i64,
    pub notices: broadcast::Receiver<Notice>,
    pub shutdown: CancellationToken,
}

impl Subscription {
    /// Sends the job's events after `last_id`, then each new one as it is recorded, until the
    /// job reaches a terminal status, is deleted, the client goes away or the server drains.
    pub(crate) async fn pump(mut self, out: EventSender) {
        let mut poll = tokio::time::interval(POLL_FALLBACK);
        poll.tick().await;
        let mut check_finished = true;
        loop {
            match self.send_new(&out).await {
                Ok(Flow::Continue) => {}
                Ok(Flow::Stop) => return,
                Err(e) => tracing::warn!(error = %e, job_id = %self.job_id, "reading job events"),
            }
            if check_finished && self.finished().await {
                // Send what was recorded between the read above and the check.
                let _ = self.send_new(&out).await;
                return;
            }
            check_finished = false;
            loop {
                tokio::select! {
                    _ = self.shutdown.cancelled() => return,
                    _ = out.closed() => return,
                    _ = poll.tick() => { check_finished = true; break; }
                    notice = self.notices.recv() => match notice {
                        Ok(Notice::Job(job)) if job != self.job_id => continue,
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => break,
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                }
            }
        }
    }

    async fn send_new(&mut self, out: &EventSender) -> sidbooth_core::error::Result<Flow> {
        loop {
            let events = self.jobs.events_since(self.job_id, self.last_id).await?;
            let full_page = events.len() >= 1000;
            for event in events {
                self.last_id = event.id;
                let terminal = event.kind == "status"
                    && event
                        .data
                        .get("status")
                        .and_then(|s| serde_json::from_value::<JobStatus>(s.clone()).ok())
                        .is_some_and(JobStatus::is_terminal);
                let sse = Event::default()
                    .id(event.id.to_string())
                    .event(event.kind.clone())
                    .json_data(&event)
                    .unwrap_or_else(|_| Event::default().comment("unserialisable event"));
                if out.send(Ok(sse)).await.is_err() || terminal {
                    return Ok(Flow::Stop);
                }
            }
            if !full_page {
                return Ok(Flow::Continue);
            }
        }
    }

    /// Whether the job is gone or already finished (with nothing left to send).
    async fn finished(&self) -> bool {
        match self.jobs.get(self.tenant, self.job_id).await {
            Ok(job) => job.status.is_terminal(),
            Err(sidbooth_core::CoreError::NotFound) => true,
            Err(_) => false,
        }
    }
}

enum Flow {
    Continue,
    Stop,
}
