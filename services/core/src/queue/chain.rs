//! The batching task behind [`Queue::succeed_and_claim`] and [`Queue::finish_and_claim`]: one
//! statement at a time records the successes that wait and claims the slots' next jobs.
//!
//! * Batching: while a statement runs, the slots that finish meanwhile form the next batch.
//!   (Two or four statements in flight were measured slower: they contend for the head of the
//!   queue.) Before sending a batch smaller than the number of jobs handed out since the last
//!   one, the task lets the slots run a few times: a quick job comes back at once and joins.
//! * Claiming ahead: while a worker's jobs are quick (handed out and finished within
//!   `quick_job_secs`), each statement also claims a next job for every slot that had to wait,
//!   kept ready. A slot that finishes while jobs are ready gets one at once, even while a
//!   statement is running, and its success goes into the next statement: slots no longer wait
//!   for every commit, and a statement records many successes instead of one per slot. A ready
//!   job not handed out within a second (far less than a lease) is given back, and so are those
//!   left when the worker flushes; slow jobs claim nothing ahead, so a long job never holds
//!   another one.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use sqlx::{pool::PoolConnection, Postgres};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::{Claimed, Lease, Queue};
use crate::{
    error::{CoreError, Result},
    jobs::JobRecord,
};

/// Most successes one statement records; more wait for the next statement.
const MAX_CHAIN: usize = 64;

/// How many times the task lets other tasks run while it waits for the slots it gave jobs
/// (a slot whose job is quick comes back within microseconds; one whose job takes minutes is
/// not waited for).
const GATHER_YIELDS: usize = 8;

/// How long the task keeps its connection while no success comes (an idle connection goes
/// back to the pool, which waits for it on close).
const KEEP_CONNECTION: Duration = Duration::from_millis(100);

/// Most time a job claimed ahead waits to be handed out before it is given back (a quarter of
/// the lease where that is shorter).
const READY_TTL: Duration = Duration::from_secs(1);

/// What one statement did: each lease's success in order, and the jobs it claimed.
pub(super) struct Batch {
    pub successes: Vec<Result<JobRecord>>,
    pub claimed: Vec<Claimed>,
}

pub(super) enum Request {
    /// Record the success; answer with its record and the next job after the commit.
    Succeed {
        lease: Lease,
        reply: oneshot::Sender<Result<(JobRecord, Option<Claimed>)>>,
    },
    /// Answer with the next job as soon as one is ready; record the success with the next
    /// statement.
    Finish {
        lease: Lease,
        reply: oneshot::Sender<Result<Option<Claimed>>>,
    },
    /// Answer once nothing waits to be recorded and the ready jobs are given back.
    Flush { reply: oneshot::Sender<()> },
}

pub(super) type Sender = mpsc::UnboundedSender<Request>;

/// Starts the task for `queue`; it ends when every sender is dropped.
pub(super) fn start(queue: Queue) -> Sender {
    let (sender, requests) = mpsc::unbounded_channel();
    tokio::spawn(Chain::new(queue).run(requests));
    sender
}

/// Who waits for a success to be recorded.
enum Waiter {
    /// [`Request::Succeed`]: the record and the next job.
    Record(oneshot::Sender<Result<(JobRecord, Option<Claimed>)>>),
    /// [`Request::Finish`] with nothing ready: the next job.
    Next(oneshot::Sender<Result<Option<Claimed>>>),
    /// [`Request::Finish`] already answered from the ready jobs: a failure is only logged.
    Nobody,
}

struct Pending {
    lease: Lease,
    quick: bool,
    waiter: Waiter,
}

struct Chain {
    queue: Queue,
    /// A job handed out and finished within this long is quick: its slot will likely be back
    /// before the next statement returns.
    quick: Duration,
    ready_ttl: Duration,
    /// The statements run on one connection kept while successes come: its backend stays
    /// warm and no statement waits for the pool.
    conn: Option<PoolConnection<Postgres>>,
    pending: VecDeque<Pending>,
    /// Jobs claimed ahead, with when.
    ready: VecDeque<(Claimed, Instant)>,
    /// When this task handed each running job to a slot (how quick it was, at its success).
    handed: HashMap<Uuid, Instant>,
    /// Jobs handed out since the last statement began (the slots the next batch waits for).
    handed_out: usize,
    /// The most slots with quick jobs that waited for one statement: as many jobs are kept
    /// ready.
    quick_slots: usize,
    flushes: Vec<oneshot::Sender<()>>,
    /// Claimed jobs whose slot stopped waiting, to give back.
    orphans: Vec<Lease>,
}

impl Chain {
    fn new(queue: Queue) -> Self {
        let settings = queue.settings();
        let quick = Duration::from_secs_f64(settings.quick_job_secs.max(0.0));
        let ready_ttl = READY_TTL.min(settings.lease() / 4);
        Self {
            quick,
            ready_ttl,
            queue,
            conn: None,
            pending: VecDeque::new(),
            ready: VecDeque::new(),
            handed: HashMap::new(),
            handed_out: 0,
            quick_slots: 0,
            flushes: Vec::new(),
            orphans: Vec::new(),
        }
    }

    async fn run(mut self, mut requests: mpsc::UnboundedReceiver<Request>) {
        loop {
            if self.pending.is_empty() {
                if !self.flushes.is_empty() {
                    self.give_back_ready().await;
                    for flush in self.flushes.drain(..) {
                        let _ = flush.send(());
                    }
                }
                let Some(first) = self.wait(&mut requests).await else {
                    break;
                };
                self.take(first);
            }
            self.gather(&mut requests).await;
            self.expire_ready().await;
            if !self.pending.is_empty() {
                self.run_batch(&mut requests).await;
            }
            self.give_back_orphans().await;
        }
        self.give_back_ready().await;
    }

    /// The next request; meanwhile lets the connection go and gives back expired ready jobs.
    async fn wait(&mut self, requests: &mut mpsc::UnboundedReceiver<Request>) -> Option<Request> {
        loop {
            let until_expiry = self
                .ready
                .front()
                .map(|(_, at)| self.ready_ttl.saturating_sub(at.elapsed()));
            let keep = self.conn.as_ref().map(|_| KEEP_CONNECTION);
            let Some(limit) = until_expiry.into_iter().chain(keep).min() else {
                return requests.recv().await;
            };
            match tokio::time::timeout(limit, requests.recv()).await {
                Ok(request) => return request,
                Err(_) => {
                    self.conn = None;
                    self.expire_ready().await;
                }
            }
        }
    }

    /// Takes requests that have come, letting quick slots come back a few times first.
    async fn gather(&mut self, requests: &mut mpsc::UnboundedReceiver<Request>) {
        let mut yields = 0;
        loop {
            while self.pending.len() < MAX_CHAIN {
                match requests.try_recv() {
                    Ok(request) => self.take(request),
                    Err(_) => break,
                }
            }
            if self.pending.len() >= self.handed_out.min(MAX_CHAIN) || yields == GATHER_YIELDS {
                return;
            }
            tokio::task::yield_now().await;
            yields += 1;
        }
    }

    fn take(&mut self, request: Request) {
        match request {
            Request::Succeed { lease, reply } => {
                let quick = self.was_quick(&lease);
                self.pending.push_back(Pending {
                    lease,
                    quick,
                    waiter: Waiter::Record(reply),
                });
            }
            Request::Finish { lease, reply } => {
                let quick = self.was_quick(&lease);
                let waiter = match self.ready.pop_front() {
                    Some((next, _)) => {
                        self.hand(next, |next| reply.send(Ok(Some(next))).map_err(|_| ()));
                        Waiter::Nobody
                    }
                    None => Waiter::Next(reply),
                };
                self.pending.push_back(Pending {
                    lease,
                    quick,
                    waiter,
                });
            }
            Request::Flush { reply } => self.flushes.push(reply),
        }
    }

    fn was_quick(&mut self, lease: &Lease) -> bool {
        self.handed
            .remove(&lease.job_id)
            .is_some_and(|at| at.elapsed() < self.quick)
    }

    /// Gives `job` to a slot through `send`; a slot that stopped waiting has it given back.
    fn hand(&mut self, job: Claimed, send: impl FnOnce(Claimed) -> std::result::Result<(), ()>) {
        let lease = job.lease;
        if send(job).is_ok() {
            // Jobs that end otherwise (failed, given back) never come back here: past `quick`
            // an entry tells nothing, so a long map keeps only the recent ones.
            if self.handed.len() >= 4 * MAX_CHAIN {
                let quick = self.quick;
                self.handed.retain(|_, at| at.elapsed() < quick);
            }
            self.handed.insert(lease.job_id, Instant::now());
            self.handed_out += 1;
        } else {
            self.orphans.push(lease);
        }
    }

    /// One statement for the pending successes; answers their slots. Requests that come while
    /// it runs are taken meanwhile (slots with quick jobs get the ready ones).
    async fn run_batch(&mut self, requests: &mut mpsc::UnboundedReceiver<Request>) {
        let n = self.pending.len().min(MAX_CHAIN);
        let batch: Vec<Pending> = self.pending.drain(..n).collect();
        let leases: Vec<Lease> = batch.iter().map(|p| p.lease).collect();
        let waiting = batch
            .iter()
            .filter(|p| !matches!(p.waiter, Waiter::Nobody))
            .count();
        let quick_waiting = batch
            .iter()
            .filter(|p| p.quick && !matches!(p.waiter, Waiter::Nobody))
            .count();
        let ahead = if batch.iter().any(|p| p.quick) {
            self.quick_slots = self.quick_slots.max(quick_waiting);
            // The claims of successes nobody waits for refill the ready jobs; claim more so
            // that as many are ready as slots with quick jobs.
            let refilled = self.ready.len() + (batch.len() - waiting);
            self.quick_slots.saturating_sub(refilled)
        } else {
            self.quick_slots = 0;
            0
        };
        self.handed_out = 0;

        let queue = self.queue.clone();
        let conn = self.conn.take();
        let statement = async move {
            let mut conn = match conn {
                Some(conn) => conn,
                None => queue.pool.acquire().await?,
            };
            let batch = queue.chain_statement(&mut conn, &leases, ahead).await?;
            Ok::<_, CoreError>((conn, batch))
        };
        tokio::pin!(statement);
        let result = loop {
            tokio::select! {
                result = &mut statement => break result,
                Some(request) = requests.recv(), if self.pending.len() < MAX_CHAIN => {
                    self.take(request);
                }
            }
        };
        match result {
            Ok((conn, done)) => {
                self.conn = Some(conn);
                self.answer(batch, done);
            }
            Err(e) if batch.len() == 1 => {
                let mut batch = batch;
                batch.remove(0).fail(e);
            }
            // Each on its own, so that every slot gets its own answer.
            Err(_) => {
                for pending in batch {
                    let one = match self.queue.pool.acquire().await {
                        Ok(mut conn) => {
                            self.queue
                                .chain_statement(&mut conn, &[pending.lease], 0)
                                .await
                        }
                        Err(e) => Err(e.into()),
                    };
                    match one {
                        Ok(done) => self.answer(vec![pending], done),
                        Err(e) => pending.fail(e),
                    }
                }
            }
        }
    }

    /// Hands the statement's claims to the slots that wait, in order, and keeps the rest
    /// ready; answers every success.
    fn answer(&mut self, batch: Vec<Pending>, done: Batch) {
        let mut claimed = done.claimed.into_iter();
        for (pending, success) in batch.into_iter().zip(done.successes) {
            let record = match success {
                Ok(record) => record,
                Err(e) => {
                    pending.fail(e);
                    continue;
                }
            };
            match pending.waiter {
                Waiter::Record(reply) => match claimed.next() {
                    Some(next) => self.hand(next, |next| {
                        reply.send(Ok((record, Some(next)))).map_err(|_| ())
                    }),
                    None => {
                        let _ = reply.send(Ok((record, None)));
                    }
                },
                Waiter::Next(reply) => match claimed.next() {
                    Some(next) => {
                        self.hand(next, |next| reply.send(Ok(Some(next))).map_err(|_| ()))
                    }
                    None => {
                        let _ = reply.send(Ok(None));
                    }
                },
                Waiter::Nobody => {}
            }
        }
        let now = Instant::now();
        self.ready.extend(claimed.map(|job| (job, now)));
    }

    async fn expire_ready(&mut self) {
        while self
            .ready
            .front()
            .is_some_and(|(_, at)| at.elapsed() >= self.ready_ttl)
        {
            let (job, _) = self.ready.pop_front().expect("checked");
            self.orphans.push(job.lease);
        }
        self.give_back_orphans().await;
    }

    async fn give_back_ready(&mut self) {
        self.orphans
            .extend(self.ready.drain(..).map(|(job, _)| job.lease));
        self.give_back_orphans().await;
    }

    async fn give_back_orphans(&mut self) {
        for lease in std::mem::take(&mut self.orphans) {
            if let Err(e) = self.queue.release(&lease).await {
                tracing::warn!(job_id = %lease.job_id, error = %e,
                    "could not give back a job claimed ahead; it runs again when its lease ends");
            }
        }
    }
}

impl Pending {
    /// Its statement failed: its slot gets the error (one nobody waits for is logged; the
    /// job's lease then runs out and it runs again).
    fn fail(self, e: CoreError) {
        match self.waiter {
            Waiter::Record(reply) => {
                let _ = reply.send(Err(e));
            }
            Waiter::Next(reply) => {
                let _ = reply.send(Err(e));
            }
            Waiter::Nobody => tracing::warn!(job_id = %self.lease.job_id, error = %e,
                "a finished job's success could not be recorded; it runs again when its lease ends"),
        }
    }
}
