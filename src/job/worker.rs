//! Workers: take batch tasks off the queue, call the API under the limiter,
//! and store what happened. Any number run, in any number of processes and
//! machines, against one database.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use apalis::prelude::*;
use tokio::sync::Mutex;

use crate::api::BatchEntry;
use crate::call::allow::ApiAllow;
use crate::call::client::{ApiClient, Outcome, backoff};
use crate::call::limiter::{Denied, SharedLimiter};
use crate::job::queue::{self, BatchTask, Lane};
use crate::prometheus::{self, CallKind};
use crate::spec::JobSpec;
use crate::store::StoreError;
use crate::store::{Answer, Answered, CallEnd, CallTo, DecodedVin, Reschedule, Store};
use crate::vin::Vin;

/// What one job needs to call the API, built once per process.
struct JobRuntime {
    spec: JobSpec,
    client: ApiClient,
    /// The job's account's limiter, registered (the account's row written
    /// from this spec) when this process first works the job: a job
    /// submitted with a changed rate, burst, quota or cap takes effect at
    /// its first call, in a worker that has run for days too. Specs that
    /// disagree on one account share its row, which holds the settings
    /// registered last (README, One rate limit for the whole fleet).
    limiter: SharedLimiter,
}

/// Shared by every task this worker runs.
pub struct WorkerState {
    store: Store,
    schema: String,
    /// The address of the API this process hosts (`vinetl run` of an
    /// embedded spec): embedded jobs are called there, whatever their stored
    /// spec says. `None` in `vinetl worker`, which never sees embedded jobs.
    embedded: Option<String>,
    /// The API hosts and key variables this process may use, whatever a
    /// stored spec says.
    allow: ApiAllow,
    jobs: Mutex<HashMap<i64, Arc<JobRuntime>>>,
    results: ResultWriter,
    /// `--concurrency`: the calls this process has in flight, from the
    /// limiter's wait to the end of its request (to the stored outcome, for
    /// any outcome but an answer). A task whose answer is only waiting to be
    /// stored holds none, so the next call starts meanwhile.
    calls: Arc<tokio::sync::Semaphore>,
    /// Set once the worker is told to stop: a task still waiting for its
    /// place then gives its batch back instead of calling (see [`place`]).
    stopping: tokio::sync::watch::Sender<bool>,
}

/// Queue tasks a worker runs at once per call it may have in flight. A call
/// takes about 15 ms on loopback (limiter, claim, request) and then
/// waits about 25 ms for its answer's group to commit (BENCHMARKS.md); a
/// task that held its call's place through that wait left the API and the
/// cores idle. Four tasks per call keep the calls busy; the extra ones only
/// wait for the result writer, holding no database connection.
const TASKS_PER_CALL: usize = 4;

/// An answer waiting to be stored.
type PendingAnswer = (Answered, Waiter);

/// Who waits for an answer to be stored: its job, the limiter of the
/// account that gave it, and where to say how that went.
struct Waiter {
    job_id: i64,
    limiter: SharedLimiter,
    reply: tokio::sync::oneshot::Sender<Result<Stored, StoreError>>,
}

/// An answer is committed; `busy`: its job still had batches queued or
/// running after the commit, so there is nothing for [`advance`] to do.
///
/// [`advance`]: crate::job::advance::advance
#[derive(Debug, Clone, Copy)]
struct Stored {
    busy: bool,
}

/// Stores this process's answers (batch decodes and recall lookups) in groups: whatever answers
/// arrive while one group commits go together in the next, in one
/// transaction ([`Store::complete_all`]). An idle process commits each
/// answer at once, so grouping adds no wait; a busy one pays one commit and
/// one update of the job's counters for many calls instead of one each.
/// The group's other bookkeeping is paid once per group too: the limiter
/// hears of the accounts' successes once, and whether each job still has
/// work is asked once, after the commit (as [`advance`] would).
/// A caller returns only once its answer is stored, so a kill loses at most
/// the answers not yet committed, whose batches are then taken over as
/// before. Hand-written: it is a channel and a loop, no crate needed.
///
/// [`advance`]: crate::job::advance::advance
struct ResultWriter {
    send: tokio::sync::mpsc::UnboundedSender<PendingAnswer>,
}

impl ResultWriter {
    /// The most answers one transaction stores (8,000 VINs of batch decodes).
    const GROUP_MAX: usize = 400;

    fn start(store: Store) -> ResultWriter {
        let (send, mut receive) = tokio::sync::mpsc::unbounded_channel::<PendingAnswer>();
        tokio::spawn(async move {
            while let Some(first) = receive.recv().await {
                let mut group = vec![first];
                while group.len() < Self::GROUP_MAX {
                    match receive.try_recv() {
                        Ok(next) => group.push(next),
                        Err(_) => break,
                    }
                }
                let (answers, waiters): (Vec<Answered>, Vec<Waiter>) = group.into_iter().unzip();
                match store.complete_all(&answers).await {
                    Ok(()) => settle(&store, waiters).await,
                    Err(e) if answers.len() == 1 => {
                        let _ = waiters.into_iter().next().map(|w| w.reply.send(Err(e)));
                    }
                    Err(e) => {
                        // One bad answer (or a lost connection) must not
                        // fail the others: each is stored alone, with its
                        // own outcome.
                        tracing::warn!(error = %e, answers = answers.len(), "storing a group of answers failed; storing each alone");
                        for (answer, waiter) in answers.into_iter().zip(waiters) {
                            match store.complete_all(std::slice::from_ref(&answer)).await {
                                Ok(()) => settle(&store, vec![waiter]).await,
                                Err(e) => drop(waiter.reply.send(Err(e))),
                            }
                        }
                    }
                }
            }
        });
        ResultWriter { send }
    }

    /// Stores one answer, with whatever others are waiting; returns once it is committed.
    async fn store(&self, answer: Answered, limiter: &SharedLimiter) -> Result<Stored, StoreError> {
        let (reply, stored) = tokio::sync::oneshot::channel();
        let waiter = Waiter { job_id: answer.job_id, limiter: limiter.clone(), reply };
        self.send.send((answer, waiter)).map_err(|_| StoreError::WriterGone)?;
        stored.await.map_err(|_| StoreError::WriterGone)?
    }
}

/// After a group's commit: each account's limiter hears once how many
/// calls the API answered, and each job is asked once whether it still has
/// work; then every caller is told. Neither can undo the commit, so neither
/// fails a caller: a limiter that missed the news recovers its rate a little
/// later, and a job whose `busy` could not be read counts as not busy, so
/// its caller runs `advance`, which asks again under the job's lock.
async fn settle(store: &Store, waiters: Vec<Waiter>) {
    let mut successes: HashMap<&str, (&SharedLimiter, usize)> = HashMap::new();
    for w in &waiters {
        successes.entry(w.limiter.account()).or_insert((&w.limiter, 0)).1 += 1;
    }
    for (account, (limiter, n)) in successes {
        if let Err(e) = limiter.succeeded(n).await {
            tracing::warn!(account, error = %e, "the limiter could not note {n} answered calls");
        }
    }
    let mut jobs: HashMap<i64, bool> = HashMap::new();
    for w in &waiters {
        if let std::collections::hash_map::Entry::Vacant(v) = jobs.entry(w.job_id) {
            v.insert(store.busy(w.job_id).await.unwrap_or_else(|e| {
                tracing::warn!(job = w.job_id, error = %e, "could not read whether the job has work left");
                false
            }));
        }
    }
    for w in waiters {
        let _ = w.reply.send(Ok(Stored { busy: jobs[&w.job_id] }));
    }
}

impl WorkerState {
    pub fn new(
        store: Store,
        schema: &str,
        concurrency: usize,
        embedded: Option<String>,
        allow: ApiAllow,
    ) -> Arc<WorkerState> {
        Arc::new(WorkerState {
            calls: Arc::new(tokio::sync::Semaphore::new(concurrency.max(1))),
            stopping: tokio::sync::watch::Sender::new(false),
            schema: schema.to_string(),
            embedded,
            allow,
            jobs: Mutex::new(HashMap::new()),
            results: ResultWriter::start(store.clone()),
            store,
        })
    }

    /// A call's place in flight, or `None` once the worker is stopping.
    /// A worker runs [`TASKS_PER_CALL`] tasks per place; without this, the
    /// tasks waiting for a place when SIGTERM came would each still make
    /// their call, up to three more rounds of calls after the stop.
    async fn place(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        tokio::select! {
            biased;
            () = self.stopped() => None,
            place = Arc::clone(&self.calls).acquire_owned() => Some(place.expect("the semaphore is never closed")),
        }
    }

    /// Completes once the worker is told to stop.
    fn stopped(&self) -> impl Future<Output = ()> + use<> {
        let mut stopping = self.stopping.subscribe();
        async move {
            if stopping.wait_for(|stop| *stop).await.is_err() {
                // The worker's state is gone, and with it every task.
                std::future::pending::<()>().await;
            }
        }
    }

    /// From now on, no task of this worker starts a call.
    fn stop_calls(&self) {
        self.stopping.send_replace(true);
    }

    async fn runtime(&self, job_id: i64) -> Result<Result<Arc<JobRuntime>, String>, StoreError> {
        // Held while a runtime is built: the first tasks of a job arrive
        // together, and each would otherwise read the spec and build a
        // client (loading the system's root certificates) of its own.
        let mut jobs = self.jobs.lock().await;
        if let Some(rt) = jobs.get(&job_id) {
            return Ok(Ok(Arc::clone(rt)));
        }
        let spec = match self.store.job_spec(job_id).await? {
            Ok(s) => s,
            Err(e) => return Ok(Err(e)),
        };
        let timeout = Duration::from_secs(spec.provider.timeout_secs);
        let client = match (&self.embedded, spec.provider.embedded) {
            (Some(url), true) => ApiClient::new(url, crate::api::EMBEDDED_KEY, timeout),
            (None, true) => {
                return Ok(Err(format!(
                    "job {job_id} calls an embedded API, which only `vinetl run` of its spec hosts; run that"
                )));
            }
            (_, false) => {
                if let Err(e) = self.allow.check(&spec.provider) {
                    return Ok(Err(format!("job {job_id}: {e}")));
                }
                ApiClient::from_spec(&spec.provider)
            }
        };
        let client = match client {
            Ok(c) => c,
            Err(e) => return Ok(Err(format!("worker {}: {e}", queue::worker_name()))),
        };
        let limiter = SharedLimiter::register(&self.store, &spec.provider).await?;
        let rt = Arc::new(JobRuntime { spec, client, limiter });
        jobs.insert(job_id, Arc::clone(&rt));
        Ok(Ok(rt))
    }
}

/// The queue handler. A panic is caught here and recorded as an abort: a
/// panic escaping to apalis would take the worker down or leave the task
/// stuck in `Running`.
pub async fn handle(task: BatchTask, state: Data<Arc<WorkerState>>) -> Result<(), BoxDynError> {
    use futures_util::FutureExt;
    use tracing::Instrument;
    let state: Arc<WorkerState> = Arc::clone(&state);
    // Every line logged while the batch is worked carries its job and batch.
    let span = tracing::info_span!("batch", job = task.job_id, batch = task.batch_no);
    match std::panic::AssertUnwindSafe(call_batch(task, &state).instrument(span)).catch_unwind().await {
        Ok(result) => result,
        Err(panic) => {
            let msg =
                panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned());
            tracing::error!(job = task.job_id, batch = task.batch_no, panic = ?msg, "batch handler panicked");
            Err(AbortError::new(format!("panic: {}", msg.unwrap_or_default())).into())
        }
    }
}

/// A 200 answer of either kind of call.
enum Reply {
    Decoded(Vec<BatchEntry>),
    Recalls(Vec<crate::api::Recall>),
}

/// One batch, one call: a batch decode, or a recall lookup.
async fn call_batch(task: BatchTask, state: &WorkerState) -> Result<(), BoxDynError> {
    let rt = match state.runtime(task.job_id).await? {
        Ok(rt) => rt,
        Err(reason) => {
            if state.store.fail_job(task.job_id, &reason).await? {
                tracing::error!(%reason, "the job cannot run; failed");
            }
            return Ok(());
        }
    };
    // The call's place in flight, up to the end of its request.
    let Some(call) = state.place().await else {
        // The worker is stopping: the batch goes back to the queue
        // unclaimed, for another worker or this one restarted.
        return give_back(state, &rt, task).await;
    };
    // The limiter first, the claim after: a batch waiting for its turn is
    // still queued, so a cancel, a pause or a stop meanwhile leaves nothing
    // claimed to undo, and the claim, the mark and the audit row are one
    // transaction before the request. A read first turns away the tasks
    // that could not claim, before they take a grant.
    let limiter = rt.limiter.clone();
    let store = &state.store;
    let (job, batch_no, lease) = (task.job_id, task.batch_no, rt.spec.provider.call_lease_secs());
    if !store.claimable(job, batch_no, task.generation, lease).await? {
        // Stale, finished, or its job paused or ended: no grant taken.
        return Ok(());
    }
    let waiting = std::time::Instant::now();
    let Some(granted) = limiter.acquire_unless(state.stopped()).await? else {
        // The worker is stopping while this call waits for the limiter: the
        // batch goes back, as one still waiting for its place does.
        return give_back(state, &rt, task).await;
    };
    prometheus::limiter_wait(&rt.spec.provider.account(), waiting.elapsed());
    let slot = match granted {
        Ok(slot) => slot,
        Err(denied) => {
            // Not now: the batch (if this task still holds it) waits.
            if store.claim(job, batch_no, task.generation, lease, None).await?.is_some() {
                not_now(state, &rt, &limiter, task, denied).await?;
            }
            return Ok(());
        }
    };
    let origin = rt.client.origin();
    let to = CallTo { provider: &origin, decode: crate::api::BATCH_DECODE_PATH, recalls: crate::api::RECALLS_PATH };
    let Some(batch) = store.claim(job, batch_no, task.generation, lease, Some(&to)).await? else {
        // Stale (an older generation), finished, or its job was paused,
        // cancelled or ended while this task waited: no call, and the
        // quota unit goes back.
        limiter.give_back(slot).await?;
        return Ok(());
    };
    let vins: Vec<Vin> = batch.vins.iter().filter_map(|v| Vin::parse(v).ok()).collect();
    let kind = if batch.lookup_key.is_some() { CallKind::Recall } else { CallKind::Decode };
    if let (Some(key), None) = (&batch.lookup_key, &batch.lookup) {
        // No call: the grant goes back.
        limiter.give_back(slot).await?;
        let reason = format!("recall lookup {key} is not registered");
        store.dead_letter(job, batch_no, task.generation, &reason, None).await?;
        crate::job::advance::advance(store, &state.schema, job, &rt.spec).await?;
        return Ok(());
    }
    let outcome = match &batch.lookup {
        None => rt.client.batch_decode(&vins).await.map_done(Reply::Decoded),
        Some(lookup) => rt.client.recalls(&recall_request(lookup)).await.map_done(|r| Reply::Recalls(r.recalls)),
    };
    // The call is made: nothing after it may lose its answer.
    let granted_at = slot.granted_at();
    limiter.release(slot).await;
    match call_end(&outcome) {
        Some(end) => prometheus::call(kind, end),
        None => prometheus::unreachable(kind),
    }
    match outcome {
        Outcome::Done(reply) => {
            // An answer cannot stop the job or slow the account, so the next
            // call may start while it waits for its group's commit. Every
            // other outcome keeps the place until it is stored: a refused
            // key fails the job, and a 429 pushes every worker back, before
            // this worker's next call can begin.
            drop(call);
            let answer = match reply {
                Reply::Decoded(entries) => {
                    prometheus::vins_decoded(entries.iter().filter(|e| matches!(e, BatchEntry::Decoded(_))).count());
                    let decoded: Vec<DecodedVin> = entries.into_iter().map(decoded_vin).collect();
                    Answer::Decoded { asked: batch.vins.clone(), decoded }
                }
                Reply::Recalls(recalls) => {
                    Answer::Recalls { key: batch.lookup_key.clone().unwrap_or_default(), recalls }
                }
            };
            if state.results.store(Answered { job_id: job, batch_no, answer }, &limiter).await?.busy {
                return Ok(());
            }
        }
        Outcome::StopJob(reason) => {
            limiter.answered(false).await?;
            store.call_ended(job, batch_no, CallEnd::OtherError).await?;
            // Every call in flight gets the same answer: the one that
            // fails the job says so; the others only add to the count.
            if store.fail_job(task.job_id, &format!("the API refused the key: {reason}")).await? {
                tracing::error!(%reason, "the API refused the key; the job failed");
            } else {
                tracing::debug!(%reason, "the API refused the key; the job had ended already");
                ended_under_call(state, &rt, task, &reason).await?;
            }
        }
        Outcome::RateLimited { retry_after } => {
            // Every worker of the account waits; the batch does not lose an attempt.
            limiter.answered(false).await?;
            let wait = limiter.push_back(retry_after, granted_at).await?;
            reschedule(state, &rt, task, wait, Reschedule::RateLimited, "429 Too Many Requests").await?;
        }
        Outcome::Unreachable(reason) => {
            // One event for the account, not a failure of this batch: the
            // circuit opens, the call is not counted, and the batch waits.
            tracing::warn!(%reason, "the API is unreachable");
            store.call_not_sent(job, batch_no).await?;
            limiter.unreachable(&reason, granted_at).await?;
            let wait = limiter.circuit().await?.map_or(Duration::from_secs(1), |c| secs_until(c.probe_at));
            wait_for_the_api(state, &rt, &limiter, task, wait).await?;
        }
        Outcome::ServerError(ref reason) | Outcome::TimedOut(ref reason) => {
            let end = if matches!(outcome, Outcome::TimedOut(_)) { CallEnd::TimedOut } else { CallEnd::ServerError };
            let reason = reason.clone();
            if limiter.server_error(&reason, granted_at).await? {
                tracing::warn!(%reason, "server errors in a row: the API is treated as down");
            }
            retry_or_dead_letter(state, &rt, task, kind, batch.attempts, end, reason).await?;
        }
        Outcome::Retry(reason) => {
            limiter.answered(false).await?;
            retry_or_dead_letter(state, &rt, task, kind, batch.attempts, CallEnd::OtherError, reason).await?;
        }
        Outcome::GiveUp(reason) => {
            limiter.answered(false).await?;
            store.dead_letter(task.job_id, task.batch_no, task.generation, &reason, Some(CallEnd::OtherError)).await?;
        }
    }
    crate::job::advance::advance(store, &state.schema, task.job_id, &rt.spec).await?;
    Ok(())
}

/// How a call ended, as the job counts it (the same mapping the arms above
/// store); `None` for a call that never reached the API.
fn call_end<T>(outcome: &Outcome<T>) -> Option<CallEnd> {
    match outcome {
        Outcome::Done(_) => Some(CallEnd::Answered),
        Outcome::RateLimited { .. } => Some(CallEnd::RateLimited),
        Outcome::ServerError(_) => Some(CallEnd::ServerError),
        Outcome::TimedOut(_) => Some(CallEnd::TimedOut),
        Outcome::StopJob(_) | Outcome::Retry(_) | Outcome::GiveUp(_) => Some(CallEnd::OtherError),
        Outcome::Unreachable(_) => None,
    }
}

/// A failed attempt: retried with backoff, or dead-lettered once the
/// batch has used its attempts.
async fn retry_or_dead_letter(
    state: &WorkerState,
    rt: &JobRuntime,
    task: BatchTask,
    kind: CallKind,
    attempts: i32,
    end: CallEnd,
    reason: String,
) -> Result<(), StoreError> {
    let attempt = attempts as u32 + 1;
    if attempt >= rt.spec.provider.max_attempts {
        let why = format!("gave up after {attempt} attempts: {reason}");
        state.store.dead_letter(task.job_id, task.batch_no, task.generation, &why, Some(end)).await
    } else {
        prometheus::retry(kind);
        reschedule(state, rt, task, backoff(attempt), Reschedule::Failed(end), &reason).await
    }
}

/// The limiter said not now to a batch this task claimed: the job waits
/// for the quota to reset, or the batch for the API to come back or for
/// its turn.
async fn not_now(
    state: &WorkerState,
    rt: &JobRuntime,
    limiter: &SharedLimiter,
    task: BatchTask,
    denied: Denied,
) -> Result<(), StoreError> {
    match denied {
        Denied::Quota { wait } => {
            // Not a failure: the job waits for the quota to reset, then goes on.
            let resume = format!("the daily quota is used up; resumes in {} s at the quota reset", wait.as_secs());
            state.store.set_waiting(task.job_id, wait.as_secs_f64(), &resume).await?;
            reschedule(state, rt, task, wait, Reschedule::NotCalled, &resume).await
        }
        Denied::Circuit { wait } => wait_for_the_api(state, rt, limiter, task, wait).await,
        Denied::Later { wait, reason } => {
            reschedule(state, rt, task, wait, Reschedule::NotCalled, &format!("limiter: {reason}")).await
        }
    }
}

/// The account's circuit is open: the job waits, saying why and until
/// when, and the batch goes back without using an attempt; or, once the API
/// has been unreachable for longer than `give_up_after`, the job fails.
async fn wait_for_the_api(
    state: &WorkerState,
    rt: &JobRuntime,
    limiter: &SharedLimiter,
    task: BatchTask,
    wait: Duration,
) -> Result<(), StoreError> {
    let circuit = limiter.circuit().await?;
    let (since, reason) = circuit.as_ref().map_or((now_secs(), String::new()), |c| (c.since, c.reason.clone()));
    let give_up = rt.spec.provider.give_up_after_secs();
    if now_secs() - since > give_up {
        let why = format!(
            "the API has been unreachable since {} ({reason}); gave up after provider.give_up_after = {}",
            timestamp(since),
            humantime::format_duration(Duration::from_secs(give_up as u64))
        );
        if state.store.fail_job(task.job_id, &why).await? {
            tracing::error!(reason = %why, "the job failed");
        } else {
            ended_under_call(state, rt, task, &why).await?;
        }
        return Ok(());
    }
    let text = format!(
        "API unreachable since {} ({reason}); next probe at {}",
        timestamp(since),
        timestamp(now_secs() + wait.as_secs_f64())
    );
    state.store.set_waiting(task.job_id, wait.as_secs_f64(), &text).await?;
    // A little after the probe: by then it has usually answered.
    let delay = wait + Duration::from_millis(fastrand::u64(50..500));
    reschedule(state, rt, task, delay, Reschedule::NotCalled, &text).await
}

fn now_secs() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

fn secs_until(t: f64) -> Duration {
    Duration::from_secs_f64((t - now_secs()).max(0.0))
}

/// Unix seconds as RFC 3339 UTC, to the second.
fn timestamp(t: f64) -> String {
    sqlx::types::chrono::DateTime::from_timestamp(t as i64, 0)
        .map_or_else(String::new, |d| d.format("%Y-%m-%d %H:%M:%S UTC").to_string())
}

/// The guide's request: by make, model and year, or by VIN.
fn recall_request(lookup: &crate::store::Lookup) -> crate::api::RecallsRequest {
    match &lookup.vin {
        Some(vin) => crate::api::RecallsRequest { vin: Some(vin.clone()), ..Default::default() },
        None => crate::api::RecallsRequest {
            vin: None,
            make: lookup.make.clone(),
            model: lookup.model.clone(),
            year: lookup.model_year.map(|y| crate::api::YearValue::Text(y.to_string())),
        },
    }
}

async fn reschedule(
    state: &WorkerState,
    rt: &JobRuntime,
    task: BatchTask,
    delay: Duration,
    kind: Reschedule,
    why: &str,
) -> Result<(), StoreError> {
    let (job, batch_no, held) = (task.job_id, task.batch_no, task.generation);
    match state.store.reschedule(job, batch_no, held, delay.as_secs_f64(), kind, why).await? {
        Some(generation) => push_again(state, rt, BatchTask { generation, ..task }, Some(delay)).await,
        // Not this task's any more, or its job was cancelled: nothing to push.
        None => Ok(()),
    }
}

/// The job of the batch this task holds ended before the task could fail
/// it: failed by another call (its batches are dead, nothing to do), or
/// cancelled, whose cancel left this batch to its call. The store ends the
/// batch as [`Store::reschedule`] ends a cancelled job's.
async fn ended_under_call(state: &WorkerState, rt: &JobRuntime, task: BatchTask, why: &str) -> Result<(), StoreError> {
    reschedule(state, rt, task, Duration::ZERO, Reschedule::NotCalled, why).await
}

/// A stopping worker's batch goes back to the queue uncalled under a new
/// generation (if this task still holds it), and its task is pushed again
/// at once, for another worker or this one restarted.
async fn give_back(state: &WorkerState, rt: &JobRuntime, task: BatchTask) -> Result<(), BoxDynError> {
    if let Some(generation) = state.store.give_back(task.job_id, task.batch_no, task.generation).await? {
        tracing::info!("stopping: the batch goes back to the queue uncalled");
        push_again(state, rt, BatchTask { generation, ..task }, None).await?;
    }
    Ok(())
}

/// Pushes the task of a batch's new generation, then marks it enqueued (a
/// crash between the two leaves it to the sweep).
async fn push_again(
    state: &WorkerState,
    rt: &JobRuntime,
    next: BatchTask,
    delay: Option<Duration>,
) -> Result<(), StoreError> {
    queue::push_tasks(&state.store, &state.schema, Lane::of(&rt.spec.provider), &[(next, delay)]).await?;
    state.store.mark_enqueued(next.job_id, &[(next.batch_no, next.generation)]).await
}

fn decoded_vin(entry: BatchEntry) -> DecodedVin {
    match entry {
        BatchEntry::Decoded(v) => {
            let raw = serde_json::value::to_raw_value(&*v).expect("a vehicle serializes");
            let some = |s: &str| (!s.is_empty()).then(|| s.to_string());
            DecodedVin {
                vin: v.vin.to_ascii_uppercase(),
                make: some(&v.make),
                model: some(&v.model),
                model_year: v.model_year.parse().ok(),
                error: None,
                raw,
            }
        }
        BatchEntry::Failed { vin, error } => DecodedVin {
            vin: vin.to_ascii_uppercase(),
            make: None,
            model: None,
            model_year: None,
            raw: serde_json::value::to_raw_value(
                &serde_json::json!({"VIN": vin, "error": {"code": error.code, "message": error.message}}),
            )
            .expect("JSON serializes"),
            error: Some((error.code, error.message)),
        },
    }
}

/// Re-pushes batches whose queue task was lost: rescheduled but never
/// pushed (a crash between the two), or claimed by a worker that died
/// mid-call. Run by every worker now and then; pushing is idempotent.
pub async fn sweep(store: &Store, schema: &str) -> Result<usize, StoreError> {
    let all = store.lost_tasks().await?;
    crate::job::advance::resume_orphaned_writes(store, schema).await?;
    let mut lanes = HashMap::new();
    for &(job_id, batch_no, generation) in &all {
        let lane = match lanes.get(&job_id) {
            Some(&lane) => lane,
            None => {
                let lane = store.job_spec(job_id).await?.map_or(Lane::Shared, |spec| Lane::of(&spec.provider));
                *lanes.entry(job_id).or_insert(lane)
            }
        };
        queue::push_tasks(store, schema, lane, &[(BatchTask { job_id, batch_no, generation }, None)]).await?;
        store.mark_enqueued(job_id, &[(batch_no, generation)]).await?;
    }
    // A job whose last answer was stored by a worker that could not go on
    // to `advance` it (the database dropped after the commit; the queue's
    // retry of that task finds its batch done and does nothing).
    for job_id in store.stalled_jobs().await? {
        match store.job_spec(job_id).await? {
            Ok(spec) => {
                let next = crate::job::advance::advance(store, schema, job_id, &spec).await?;
                tracing::warn!(job = job_id, ?next, "a job whose batches had all ended was moved on by the sweep");
            }
            Err(reason) => {
                store.fail_job(job_id, &reason).await?;
            }
        }
    }
    Ok(all.len())
}

/// Runs a worker until `stop` resolves, then drains in-flight calls; its
/// tasks still waiting for a place give their batches back. With
/// `embedded` (the address of this process's in-process API) it works the
/// embedded lane, calling that address; otherwise the shared lane.
pub async fn run(
    store: Store,
    schema: &str,
    concurrency: usize,
    embedded: Option<String>,
    allow: ApiAllow,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let name = queue::worker_name();
    let lane = if embedded.is_some() { Lane::Embedded } else { Lane::Shared };
    let state = WorkerState::new(store.clone(), schema, concurrency, embedded, allow);
    let stopping = Arc::clone(&state);
    let tasks = concurrency.max(1) * TASKS_PER_CALL;
    let ctx = WorkerContext::new(&name);
    // One builder for either backend (their types differ, the wiring does not).
    macro_rules! build {
        ($backend:expr) => {
            WorkerBuilder::new(&ctx)
                .backend($backend.poll_with_strategy(queue::SteadyInterval::new(queue::POLL_INTERVAL)))
                .data(state)
                .concurrency(tasks)
                // Each call on its own tokio task, so calls use every core.
                .parallelize(|f| tokio::spawn(f))
                .on_event(|ctx, ev| {
                    if let Event::Error(e) = ev {
                        tracing::warn!(worker = %ctx.name(), error = %e, "task failed");
                    }
                })
                .build(handle)
        };
    }
    let sweeper = {
        let store = store.clone();
        let schema = schema.to_string();
        tokio::spawn(async move {
            loop {
                // Lost tasks are rare; a sweep every 10 s finds them soon enough.
                tokio::time::sleep(Duration::from_secs(10)).await;
                if let Err(e) = sweep(&store, &schema).await {
                    tracing::warn!(error = %e, "sweep failed");
                }
            }
        })
    };
    let stopper = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            stop.await;
            tracing::info!("stopping: draining in-flight calls");
            stopping.stop_calls();
            while ctx.stop().is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    tracing::info!(worker = %name, concurrency, "worker started");
    let result = match (store.pg_pool(), store.sqlite_pools()) {
        (Some(pool), _) => build!(queue::worker_storage(pool, schema, lane, tasks)).run().await,
        (None, Some((_, queue))) => build!(queue::sqlite_storage(queue, lane, tasks)).run().await,
        (None, None) => unreachable!("a store is Postgres or SQLite"),
    };
    sweeper.abort();
    stopper.abort();
    result.map_err(|e| anyhow::anyhow!("worker {name} failed: {e}"))
}
