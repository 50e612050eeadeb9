//! Delivery: workers per lane drain the outbox to Batch. Each step claims a set of users (claim
//! committed first), plans their operations, waits for the lane's rate budget, sends, retries what
//! is worth retrying until the deadline, splits refused calls to isolate bad operations, and
//! settles the answer in the database.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde_json::Value;
use sqlx::PgPool;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::batch::client::{AudienceAction, AudienceIdChange, BatchClient, Outcome, PartialError};
use crate::batch::limits::{
    AUDIENCE_REQUESTS_PER_SECOND, AUDIENCE_UPDATE_MAX_IDS, MAX_ATTRIBUTES_PER_OPERATION,
    MAX_EVENTS_PER_OPERATION,
};
use crate::batch::operation::{Event, Operation};
use crate::batch::retry::Backoff;
use crate::config::DeliverySettings;
use crate::outbox::{self, Claim, ClaimedChange, Lane};
use crate::progress::{self, Progress};

/// A stop request shared by workers: checked between steps and able to cut a backoff short.
#[derive(Default)]
pub struct StopSignal {
    stopped: AtomicBool,
    notify: Notify,
}

impl StopSignal {
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// Sleeps for `duration` unless a stop comes first; returns false when stopped.
    pub async fn sleep(&self, duration: Duration) -> bool {
        let notified = self.notify.notified();
        if self.is_stopped() {
            return false;
        }
        tokio::select! {
            _ = tokio::time::sleep(duration) => !self.is_stopped(),
            _ = notified => false,
        }
    }
}

/// Counters of what delivery did, shared by all workers.
#[derive(Debug, Default)]
pub struct DeliveryStats {
    pub requests: AtomicU64,
    pub operations: AtomicU64,
    pub acknowledged: AtomicU64,
    pub rejected: AtomicU64,
    pub retries: AtomicU64,
    pub rate_limited: AtomicU64,
    pub split_calls: AtomicU64,
    pub bulk_operations: AtomicU64,
    /// List changes sent to custom audiences (one id added or removed each).
    pub audience_operations: AtomicU64,
}

/// A copy of [`DeliveryStats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeliveryTotals {
    pub requests: u64,
    pub operations: u64,
    pub acknowledged: u64,
    pub rejected: u64,
    pub retries: u64,
    pub rate_limited: u64,
    pub split_calls: u64,
    pub bulk_operations: u64,
    pub audience_operations: u64,
}

impl DeliveryStats {
    pub fn totals(&self) -> DeliveryTotals {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        DeliveryTotals {
            requests: get(&self.requests),
            operations: get(&self.operations),
            acknowledged: get(&self.acknowledged),
            rejected: get(&self.rejected),
            retries: get(&self.retries),
            rate_limited: get(&self.rate_limited),
            split_calls: get(&self.split_calls),
            bulk_operations: get(&self.bulk_operations),
            audience_operations: get(&self.audience_operations),
        }
    }
}

/// How a drain ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DrainEnd {
    /// Nothing is left in the outbox for the drained definitions.
    Complete,
    /// The deadline passed (or a stop came) with changes still pending; they stay for next time.
    Incomplete {
        pending: i64,
        last_error: Option<String>,
    },
    /// Batch refused the keys or the address; nothing more can succeed until an operator acts.
    Fatal { reason: String },
}

/// A profile-count rate budget (Batch counts profiles, not requests).
pub struct ProfileLimiter {
    limiter: DefaultDirectRateLimiter,
    burst: u32,
}

impl ProfileLimiter {
    pub fn new(per_second: u32, burst: u32) -> Self {
        let per_second = NonZeroU32::new(per_second.max(1)).expect("at least 1");
        let burst = NonZeroU32::new(burst.max(1)).expect("at least 1");
        Self {
            limiter: RateLimiter::direct(Quota::per_second(per_second).allow_burst(burst)),
            burst: burst.get(),
        }
    }

    /// Waits until `profiles` updates fit the budget; more than one burst is taken in pieces.
    pub async fn acquire(&self, profiles: usize) {
        let mut left = profiles as u64;
        while left > 0 {
            let take = left.min(self.burst as u64) as u32;
            let take = NonZeroU32::new(take).expect("positive");
            // Cannot fail: `take` never exceeds the burst.
            let _ = self.limiter.until_n_ready(take).await;
            left -= take.get() as u64;
        }
    }
}

/// One operation and the outbox rows it carries (indices into the claim's changes).
#[derive(Debug, Clone)]
pub struct PlannedOperation {
    pub operation: Operation,
    pub changes: Vec<usize>,
}

/// Groups claimed changes by user into operations of at most 50 attributes and 15 events each.
/// The bulk lane sends attributes only (a row's event waits for the incremental lane).
pub fn plan_operations(changes: &[ClaimedChange], lane: Lane) -> Vec<PlannedOperation> {
    let mut by_user: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (index, change) in changes.iter().enumerate() {
        by_user.entry(&change.custom_id).or_default().push(index);
    }
    let sends_events = lane == Lane::Incremental;
    let mut planned = Vec::with_capacity(by_user.len());
    for (custom_id, indices) in by_user {
        let mut current = PlannedOperation {
            operation: Operation::for_custom_id(custom_id),
            changes: Vec::new(),
        };
        for index in indices {
            let change = &changes[index];
            let attribute = change.attribute.as_ref();
            let event = change.event.as_ref().filter(|_| sends_events);
            let full = (attribute.is_some()
                && current.operation.attributes.len() >= MAX_ATTRIBUTES_PER_OPERATION)
                || (event.is_some() && current.operation.events.len() >= MAX_EVENTS_PER_OPERATION);
            if full {
                let next = PlannedOperation {
                    operation: Operation::for_custom_id(custom_id),
                    changes: Vec::new(),
                };
                planned.push(std::mem::replace(&mut current, next));
            }
            if let Some(attribute) = attribute {
                current
                    .operation
                    .attributes
                    .insert(attribute.clone(), change.value.clone());
            }
            if let Some(event) = event {
                match serde_json::from_value::<Event>(event.clone()) {
                    Ok(event) => current.operation.events.push(event),
                    Err(error) => warn!(
                        definition = %change.definition_key,
                        custom_id = %change.custom_id,
                        %error,
                        "An outbox event is malformed; sending the rest of the change."
                    ),
                }
            }
            current.changes.push(index);
        }
        planned.push(current);
    }
    planned
}

/// The position of the event a partial error names (`event 2: …`), when it names one.
fn event_index(reason: &str) -> Option<usize> {
    reason
        .strip_prefix("event ")?
        .split(':')
        .next()?
        .trim()
        .parse()
        .ok()
}

/// One id's change in a custom audience and the outbox row it carries.
#[derive(Debug, Clone)]
pub struct PlannedListChange {
    pub audience: String,
    pub change: AudienceIdChange,
    pub index: usize,
}

/// Groups claimed custom-audience changes by audience, in calls of at most 10,000 ids each.
pub fn plan_list_changes(changes: &[ClaimedChange]) -> Vec<Vec<PlannedListChange>> {
    let mut by_audience: BTreeMap<&str, Vec<PlannedListChange>> = BTreeMap::new();
    for (index, change) in changes.iter().enumerate() {
        let Some(audience) = change.audience.as_deref() else {
            continue;
        };
        let action = if change.value == Value::Bool(true) {
            AudienceAction::Add
        } else {
            AudienceAction::Remove
        };
        by_audience
            .entry(audience)
            .or_default()
            .push(PlannedListChange {
                audience: audience.to_owned(),
                change: AudienceIdChange {
                    action,
                    id: change.custom_id.clone(),
                },
                index,
            });
    }
    by_audience
        .into_values()
        .flat_map(|list| {
            list.chunks(AUDIENCE_UPDATE_MAX_IDS)
                .map(<[PlannedListChange]>::to_vec)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// One unit of a call: what halving splits and partial errors point at.
#[derive(Debug, Clone)]
enum Unit {
    Profile(PlannedOperation),
    List(PlannedListChange),
}

impl Unit {
    fn changes(&self) -> &[usize] {
        match self {
            Unit::Profile(planned) => &planned.changes,
            Unit::List(planned) => std::slice::from_ref(&planned.index),
        }
    }

    fn custom_id(&self) -> &str {
        match self {
            Unit::Profile(planned) => &planned.operation.identifiers.custom_id,
            Unit::List(planned) => &planned.change.id,
        }
    }
}

/// Drains the outbox through both lanes with a shared client and per-lane budgets.
pub struct Deliverer {
    pool: PgPool,
    client: Arc<BatchClient>,
    settings: DeliverySettings,
    incremental_limiter: ProfileLimiter,
    bulk_limiter: ProfileLimiter,
    /// Counts requests, not profiles.
    audience_limiter: ProfileLimiter,
    pub stats: DeliveryStats,
    pub stop: StopSignal,
    fatal: Mutex<Option<String>>,
    last_error: Mutex<Option<String>>,
    progress: Mutex<Arc<Progress>>,
    /// Prefix of this deliverer's claim tokens.
    instance: String,
    next_claim: AtomicU64,
    /// Wakes idle workers of a long-running deliverer when a diff enqueued changes.
    work_arrived: Notify,
    /// Rows settled since the outbox was last swept (see [`outbox::sweep`]).
    settled_since_sweep: AtomicU64,
}

enum StepEnd {
    /// Every claimed row was settled.
    Done,
    /// Some rows were left unsent (their lease ran out and another worker took them).
    Partial,
    /// A stop or the deadline came first.
    Stop,
}

/// How long a worker keeps going.
#[derive(Debug, Clone, Copy)]
enum Until {
    /// Until its lane is empty (for the drained definitions) or the deadline passes: `sync`.
    Drained { deadline: Instant },
    /// Until a stop; each claim gets the delivery deadline of its own: the daemon.
    Stopped,
}

/// How long an idle worker of a long-running deliverer waits before looking again; a diff wakes
/// it sooner. Also bounds how long rows of a crashed replica wait after their lease expires.
const IDLE_POLL: Duration = Duration::from_secs(1);

impl Deliverer {
    pub fn new(pool: PgPool, client: Arc<BatchClient>, settings: DeliverySettings) -> Self {
        Self {
            incremental_limiter: ProfileLimiter::new(settings.rate_per_second, settings.burst),
            // Batch allows no burst on mass-update: one second's worth is the most at once.
            bulk_limiter: ProfileLimiter::new(
                settings.bulk_rate_per_second,
                settings.bulk_rate_per_second,
            ),
            audience_limiter: ProfileLimiter::new(AUDIENCE_REQUESTS_PER_SECOND, 1),
            pool,
            client,
            settings,
            stats: DeliveryStats::default(),
            stop: StopSignal::default(),
            fatal: Mutex::new(None),
            last_error: Mutex::new(None),
            progress: Mutex::new(Arc::new(Progress::new(Vec::new(), false))),
            instance: outbox::new_instance_id(),
            next_claim: AtomicU64::new(0),
            work_arrived: Notify::new(),
            settled_since_sweep: AtomicU64::new(0),
        }
    }

    /// The progress of what is being delivered (for logs and metrics).
    pub fn progress(&self) -> Arc<Progress> {
        Arc::clone(&self.progress.lock().expect("not poisoned"))
    }

    /// Tells idle workers that new changes wait in the outbox.
    pub fn wake(&self) {
        self.work_arrived.notify_waiters();
    }

    /// Why delivery stopped for good (keys refused, wrong address), if it did.
    pub fn fatal_error(&self) -> Option<String> {
        self.fatal.lock().expect("not poisoned").clone()
    }

    /// Gives back every claim this deliverer holds (after its workers were aborted).
    pub async fn release_claims(&self) -> Result<u64, sqlx::Error> {
        outbox::release_instance(&self.pool, &self.instance).await
    }

    fn claim_token(&self) -> String {
        format!(
            "{}-{}",
            self.instance,
            self.next_claim.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Runs the lane workers until [`StopSignal::stop`], then gives back every claim still held.
    /// Returns an error when Batch refused the credentials or a database call failed.
    pub async fn run_until_stopped(self: &Arc<Self>) -> anyhow::Result<()> {
        let result = self.run_workers(None, Until::Stopped).await;
        outbox::release_instance(&self.pool, &self.instance).await?;
        result?;
        match self.fatal_error() {
            Some(reason) => Err(anyhow::anyhow!(reason)),
            None => Ok(()),
        }
    }

    async fn run_workers(
        self: &Arc<Self>,
        only: Option<Arc<Vec<String>>>,
        until: Until,
    ) -> anyhow::Result<()> {
        let mut workers = tokio::task::JoinSet::new();
        for lane in Lane::ALL {
            for _ in 0..self.settings.workers {
                let this = Arc::clone(self);
                let only = only.clone();
                workers.spawn(async move {
                    this.work_lane(lane, only.as_deref().map(Vec::as_slice), until)
                        .await
                });
            }
        }
        let mut first_error = None;
        while let Some(joined) = workers.join_next().await {
            let failure = match joined {
                Ok(Ok(())) => continue,
                Ok(Err(error)) => error,
                Err(join_error) => anyhow::anyhow!("a delivery worker failed: {join_error}"),
            };
            self.stop.stop();
            first_error.get_or_insert(failure);
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    fn limiter(&self, lane: Lane) -> &ProfileLimiter {
        match lane {
            Lane::Incremental => &self.incremental_limiter,
            Lane::Bulk => &self.bulk_limiter,
            Lane::Audience => &self.audience_limiter,
        }
    }

    /// Delivers pending changes of the given definitions (all when `None`) until none is left,
    /// the deadline passes, or Batch refuses the credentials.
    pub async fn drain(
        self: &Arc<Self>,
        only: Option<Vec<String>>,
        deadline: Instant,
    ) -> anyhow::Result<DrainEnd> {
        let only = only.map(Arc::new);
        let progress =
            Arc::new(Progress::load(&self.pool, only.as_deref().map(Vec::as_slice)).await?);
        *self.progress.lock().expect("not poisoned") = Arc::clone(&progress);
        let reporter = {
            let progress = Arc::clone(&progress);
            tokio::spawn(async move {
                let mut ticks = tokio::time::interval(progress::LOG_EVERY);
                ticks.tick().await;
                loop {
                    ticks.tick().await;
                    progress.log();
                }
            })
        };
        let result = self
            .run_workers(only.clone(), Until::Drained { deadline })
            .await;
        reporter.abort();
        progress.finish();
        result?;
        if let Some(reason) = self.fatal.lock().expect("not poisoned").clone() {
            return Ok(DrainEnd::Fatal { reason });
        }
        let pending = outbox::pending(&self.pool, only.as_deref().map(Vec::as_slice)).await?;
        Ok(if pending == 0 {
            DrainEnd::Complete
        } else {
            DrainEnd::Incomplete {
                pending,
                last_error: self.last_error.lock().expect("not poisoned").clone(),
            }
        })
    }

    async fn work_lane(
        &self,
        lane: Lane,
        only: Option<&[String]>,
        until: Until,
    ) -> anyhow::Result<()> {
        // While other workers (or a dead process whose lease has not expired) hold the last rows,
        // a draining worker waits for them rather than declaring the lane done.
        let drain_wait = Duration::from_millis(200).min(self.settings.claim_lease);
        loop {
            let deadline = match until {
                Until::Drained { deadline } => deadline,
                Until::Stopped => Instant::now() + self.settings.deadline,
            };
            if self.stop.is_stopped() || Instant::now() >= deadline {
                return Ok(());
            }
            let claim = outbox::claim(
                &self.pool,
                lane,
                lane.max_operations(),
                only,
                self.settings.claim_lease,
                self.claim_token(),
            )
            .await?;
            if claim.changes.is_empty() {
                self.sweep_after_large_settles().await;
                match until {
                    Until::Drained { .. } => {
                        if !outbox::has_pending_in_lane(&self.pool, lane, only).await? {
                            return Ok(());
                        }
                        self.stop.sleep(drain_wait).await;
                    }
                    Until::Stopped => {
                        let arrived = self.work_arrived.notified();
                        tokio::select! {
                            _ = arrived => {}
                            _ = self.stop.sleep(IDLE_POLL) => {}
                        }
                    }
                }
                continue;
            }
            match self.deliver_claim(lane, &claim, deadline).await {
                // Every row was settled (settling unclaims rows replaced meanwhile).
                Ok(StepEnd::Done) => {}
                Ok(StepEnd::Partial) => {
                    outbox::release_claim(&self.pool, &claim, None).await?;
                }
                Ok(StepEnd::Stop) => {
                    // What this claim did not settle goes back at once, not after the lease.
                    outbox::release_claim(&self.pool, &claim, None).await?;
                    return Ok(());
                }
                Err(failure) => {
                    let _ = outbox::release_claim(&self.pool, &claim, None).await;
                    return Err(failure);
                }
            }
        }
    }

    async fn deliver_claim(
        &self,
        lane: Lane,
        claim: &Claim,
        deadline: Instant,
    ) -> anyhow::Result<StepEnd> {
        let calls: Vec<Vec<Unit>> = match lane {
            Lane::Audience => plan_list_changes(&claim.changes)
                .into_iter()
                .map(|call| call.into_iter().map(Unit::List).collect())
                .collect(),
            Lane::Incremental | Lane::Bulk => plan_operations(&claim.changes, lane)
                .chunks(lane.max_operations())
                .map(|call| call.iter().cloned().map(Unit::Profile).collect())
                .collect(),
        };
        let mut stack: Vec<Vec<Unit>> = calls.into_iter().rev().collect();
        let backoff = Backoff {
            base: self.settings.retry_base,
            cap: self.settings.retry_cap,
        };
        let lease = self.settings.claim_lease;
        let mut lease_until = claim.claimed_at + lease;
        let mut end = StepEnd::Done;
        while let Some(part) = stack.pop() {
            // The budget is spent once per call: a call Batch refused with 429 or 5xx did not
            // count against its limit, and its retries are spaced by the backoff instead. The
            // Audience API counts requests; the profile endpoints count profiles.
            let cost = if lane == Lane::Audience {
                1
            } else {
                part.len()
            };
            tokio::select! {
                _ = self.limiter(lane).acquire(cost) => {}
                // A stop must not wait for a rate budget that may be seconds away.
                _ = self.stop.sleep(Duration::MAX) => return Ok(StepEnd::Stop),
            }
            let part_changes: Vec<&ClaimedChange> = part
                .iter()
                .flat_map(|unit| unit.changes().iter().map(|&index| &claim.changes[index]))
                .collect();
            let mut attempt: u32 = 0;
            loop {
                if self.stop.is_stopped() || Instant::now() >= deadline {
                    return Ok(StepEnd::Stop);
                }
                // Waiting for the budget (or a retry) may have eaten the lease: renew it before
                // sending, and never send rows another worker has taken over meanwhile.
                if lease_until.saturating_duration_since(Instant::now()) < lease / 2 {
                    let held =
                        outbox::extend_claim(&self.pool, &claim.token, &part_changes, lease, None)
                            .await?;
                    lease_until = Instant::now() + lease;
                    if held < part_changes.len() as u64 {
                        warn!(
                            lost = part_changes.len() as u64 - held,
                            "A claim's lease ran out before its call; leaving its rows to the worker that took them."
                        );
                        end = StepEnd::Partial;
                        break;
                    }
                }
                let outcome = self.send(lane, &part).await;
                self.stats.requests.fetch_add(1, Ordering::Relaxed);
                match outcome {
                    Outcome::Accepted { partial_errors } => {
                        self.stats
                            .operations
                            .fetch_add(part.len() as u64, Ordering::Relaxed);
                        let per_lane = match lane {
                            Lane::Bulk => Some(&self.stats.bulk_operations),
                            Lane::Audience => Some(&self.stats.audience_operations),
                            Lane::Incremental => None,
                        };
                        if let Some(counter) = per_lane {
                            counter.fetch_add(part.len() as u64, Ordering::Relaxed);
                        }
                        self.settle_accepted(claim, lane, &part, &partial_errors)
                            .await?;
                        break;
                    }
                    Outcome::Refused { reason, .. } if part.len() > 1 => {
                        // Halve until the refused operations stand alone; the rest goes through.
                        debug!(operations = part.len(), %reason, "Splitting a refused call.");
                        self.stats.split_calls.fetch_add(1, Ordering::Relaxed);
                        let (left, right) = part.split_at(part.len() / 2);
                        stack.push(right.to_vec());
                        stack.push(left.to_vec());
                        break;
                    }
                    Outcome::Refused { reason, .. } => {
                        let rejected: Vec<(&ClaimedChange, String)> = part[0]
                            .changes()
                            .iter()
                            .map(|&index| (&claim.changes[index], reason.clone()))
                            .collect();
                        warn!(
                            custom_id = %part[0].custom_id(),
                            %reason,
                            "Batch refused an operation; recorded in rejections."
                        );
                        self.stats
                            .rejected
                            .fetch_add(rejected.len() as u64, Ordering::Relaxed);
                        self.settle(&claim.token, lane, &[], &rejected).await?;
                        self.record_progress(rejected.iter().map(|(change, _)| *change));
                        break;
                    }
                    Outcome::Unauthorized { reason, .. } | Outcome::Failed { reason, .. } => {
                        let reason = format!(
                            "Batch answered {reason} for {}; check [batch] api_url, api_version \
                             and the keys",
                            lane.endpoint().path()
                        );
                        self.fatal
                            .lock()
                            .expect("not poisoned")
                            .get_or_insert(reason.clone());
                        self.stop.stop();
                        outbox::release_claim(&self.pool, claim, Some(&reason)).await?;
                        return Ok(StepEnd::Stop);
                    }
                    Outcome::Retryable {
                        reason,
                        retry_after,
                        rate_limited,
                    } => {
                        self.stats.retries.fetch_add(1, Ordering::Relaxed);
                        if rate_limited {
                            self.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
                        }
                        let wait = retry_after.unwrap_or_else(|| backoff.delay(attempt));
                        attempt = attempt.saturating_add(1);
                        debug!(%reason, attempt, wait_ms = wait.as_millis() as u64, "Retrying a call to Batch.");
                        // A failure that is not Batch's pacing (a wrong api_url, Batch down) is
                        // told at once, not after the ten attempts a minute or more of backoff takes.
                        if (attempt == 1 && !rate_limited) || attempt % 10 == 0 {
                            warn!(%reason, attempt, "Batch keeps failing; still retrying.");
                        }
                        *self.last_error.lock().expect("not poisoned") = Some(reason.clone());
                        outbox::extend_claim(
                            &self.pool,
                            &claim.token,
                            &part_changes,
                            lease + wait,
                            Some(&reason),
                        )
                        .await?;
                        lease_until = Instant::now() + lease + wait;
                        let wait = wait.min(deadline.saturating_duration_since(Instant::now()));
                        if !self.stop.sleep(wait).await {
                            return Ok(StepEnd::Stop);
                        }
                    }
                }
            }
        }
        Ok(end)
    }

    /// Sends one call of a lane.
    async fn send(&self, lane: Lane, part: &[Unit]) -> Outcome {
        match lane {
            Lane::Audience => {
                let name = match &part[0] {
                    Unit::List(planned) => planned.audience.as_str(),
                    Unit::Profile(_) => unreachable!("the audience lane plans list changes"),
                };
                let ids: Vec<AudienceIdChange> = part
                    .iter()
                    .filter_map(|unit| match unit {
                        Unit::List(planned) => Some(planned.change.clone()),
                        Unit::Profile(_) => None,
                    })
                    .collect();
                self.client.update_audience(name, &ids).await
            }
            Lane::Incremental | Lane::Bulk => {
                let operations: Vec<Operation> = part
                    .iter()
                    .filter_map(|unit| match unit {
                        Unit::Profile(planned) => Some(planned.operation.clone()),
                        Unit::List(_) => None,
                    })
                    .collect();
                self.client.send(lane.endpoint(), &operations).await
            }
        }
    }

    async fn settle_accepted(
        &self,
        claim: &Claim,
        lane: Lane,
        part: &[Unit],
        partial_errors: &[PartialError],
    ) -> anyhow::Result<()> {
        let mut refused: Vec<Option<String>> = vec![None; claim.changes.len()];
        for error in partial_errors {
            let Some(planned) = part.get(error.bulk_index) else {
                warn!(
                    bulk_index = error.bulk_index,
                    "Batch reported an error for an operation that was not sent."
                );
                continue;
            };
            let reason = format!("{} ({})", error.reason, error.category);
            let named: Vec<usize> = planned
                .changes()
                .iter()
                .copied()
                .filter(|&index| {
                    let sent = claim.changes[index].attribute.as_deref();
                    error
                        .attribute
                        .as_deref()
                        .zip(sent)
                        .is_some_and(|(reported, sent)| attribute_matches(reported, sent))
                })
                .collect();
            let affected = if !named.is_empty() {
                named
            } else if error.category == "event" && lane == Lane::Incremental {
                // An event's error concerns the change that carried that event, not the
                // attributes Batch applied beside it.
                let with_events: Vec<usize> = planned
                    .changes()
                    .iter()
                    .copied()
                    .filter(|&index| claim.changes[index].event.is_some())
                    .collect();
                match event_index(&error.reason).and_then(|n| with_events.get(n)) {
                    Some(&index) => vec![index],
                    None => with_events,
                }
            } else {
                // An error that names no attribute we sent concerns the whole operation.
                planned.changes().to_vec()
            };
            for index in affected {
                refused[index] = Some(reason.clone());
            }
        }
        let mut acknowledged = Vec::new();
        let mut rejected = Vec::new();
        for planned in part {
            for &index in planned.changes() {
                match refused[index].take() {
                    Some(reason) => rejected.push((&claim.changes[index], reason)),
                    None => acknowledged.push(&claim.changes[index]),
                }
            }
        }
        if !rejected.is_empty() {
            warn!(
                rejected = rejected.len(),
                first_custom_id = %rejected[0].0.custom_id,
                first_reason = %rejected[0].1,
                "Batch dropped some attributes; recorded in rejections."
            );
        }
        self.stats
            .acknowledged
            .fetch_add(acknowledged.len() as u64, Ordering::Relaxed);
        self.stats
            .rejected
            .fetch_add(rejected.len() as u64, Ordering::Relaxed);
        self.settle(&claim.token, lane, &acknowledged, &rejected)
            .await?;
        // A row that moves on to another lane is counted when it finishes there.
        self.record_progress(
            acknowledged
                .iter()
                .copied()
                .filter(|change| lane.next_for(change).is_none())
                .chain(rejected.iter().map(|(c, _)| *c)),
        );
        Ok(())
    }

    /// Settles through [`outbox::settle`], counting the rows for [`Self::sweep_after_large_settles`].
    async fn settle(
        &self,
        token: &str,
        lane: Lane,
        acknowledged: &[&ClaimedChange],
        rejected: &[(&ClaimedChange, String)],
    ) -> Result<(), sqlx::Error> {
        outbox::settle(&self.pool, token, lane, acknowledged, rejected).await?;
        self.settled_since_sweep.fetch_add(
            (acknowledged.len() + rejected.len()) as u64,
            Ordering::Relaxed,
        );
        Ok(())
    }

    /// Once a lane ran dry after many rows were settled (a backfill), sweeps the outbox's dead rows
    /// and refreshes the statistics, so the next diff and claims do not pay for them. Autovacuum
    /// would come too, but only after a minute or more, and a daemon's next run may be sooner.
    async fn sweep_after_large_settles(&self) {
        let settled = self.settled_since_sweep.load(Ordering::Relaxed);
        if settled < outbox::SWEEP_AFTER_ROWS
            || self
                .settled_since_sweep
                .compare_exchange(settled, 0, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let started = Instant::now();
        match outbox::sweep(&self.pool).await {
            Ok(()) => info!(
                settled,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "Swept the outbox after a large delivery."
            ),
            // Only an optimisation: autovacuum does the same later.
            Err(error) => warn!(%error, "Sweeping the outbox failed; autovacuum will do it."),
        }
    }

    fn record_progress<'a>(&self, settled: impl Iterator<Item = &'a ClaimedChange>) {
        let progress = self.progress();
        let mut per_definition: BTreeMap<&str, u64> = BTreeMap::new();
        for change in settled {
            *per_definition
                .entry(outbox::family(&change.definition_key))
                .or_default() += 1;
        }
        for (key, count) in per_definition {
            progress.record(key, count);
        }
    }
}

/// Batch may name a typed attribute as `date(key)` or as `key`.
fn attribute_matches(reported: &str, sent: &str) -> bool {
    let bare = |name: &str| -> String {
        match (name.find('('), name.ends_with(')')) {
            (Some(open), true) => name[open + 1..name.len() - 1].to_owned(),
            _ => name.to_owned(),
        }
    };
    reported == sent || bare(reported) == bare(sent)
}

/// Logs the totals of a drain at INFO.
pub fn log_totals(totals: &DeliveryTotals, elapsed: Duration) {
    info!(
        requests = totals.requests,
        operations = totals.operations,
        acknowledged = totals.acknowledged,
        rejected = totals.rejected,
        retries = totals.retries,
        rate_limited = totals.rate_limited,
        elapsed_ms = elapsed.as_millis() as u64,
        "Delivery finished."
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn change(key: &str, user: &str, value: Value) -> ClaimedChange {
        ClaimedChange {
            definition_key: key.to_owned(),
            custom_id: user.to_owned(),
            attribute: Some(key.to_owned()),
            value,
            event: None,
            audience: None,
            seq: 1,
        }
    }

    #[test]
    fn one_users_changes_share_one_operation() {
        let changes = vec![
            change("a", "u1", json!(true)),
            change("b", "u2", json!(false)),
            change("b", "u1", json!(false)),
        ];
        let planned = plan_operations(&changes, Lane::Incremental);
        assert_eq!(planned.len(), 2);
        assert_eq!(
            serde_json::to_value(&planned[0].operation).unwrap(),
            json!({"identifiers": {"custom_id": "u1"}, "attributes": {"a": true, "b": false}})
        );
        assert_eq!(planned[0].changes, vec![0, 2]);
    }

    #[test]
    fn more_than_fifty_attributes_split_into_several_operations() {
        let changes: Vec<ClaimedChange> = (0..120)
            .map(|i| change(&format!("k{i}"), "u1", json!(true)))
            .collect();
        let planned = plan_operations(&changes, Lane::Incremental);
        let sizes: Vec<usize> = planned
            .iter()
            .map(|p| p.operation.attributes.len())
            .collect();
        assert_eq!(sizes, vec![50, 50, 20]);
    }

    fn with_event(mut change: ClaimedChange) -> ClaimedChange {
        change.event = Some(json!({
            "name": "trait_computed",
            "time": "2026-12-03T10:00:00.000Z",
            "attributes": {"trait_key": change.definition_key, change.definition_key.clone(): change.value},
        }));
        change
    }

    #[test]
    fn events_ride_with_attributes_up_to_fifteen_per_operation_and_never_in_bulk() {
        let changes: Vec<ClaimedChange> = (0..20)
            .map(|i| with_event(change(&format!("k{i}"), "u1", json!(i))))
            .collect();
        let planned = plan_operations(&changes, Lane::Incremental);
        let shape: Vec<(usize, usize)> = planned
            .iter()
            .map(|p| (p.operation.attributes.len(), p.operation.events.len()))
            .collect();
        assert_eq!(shape, vec![(15, 15), (5, 5)]);
        assert_eq!(
            planned[0].operation.events[0].attributes,
            json!({"trait_key": "k0", "k0": 0})
                .as_object()
                .unwrap()
                .clone()
        );

        let bulk = plan_operations(&changes, Lane::Bulk);
        assert_eq!(bulk.len(), 1);
        assert_eq!(bulk[0].operation.attributes.len(), 20);
        assert!(bulk[0].operation.events.is_empty());
    }

    #[test]
    fn list_changes_group_by_audience_with_add_for_members_and_remove_otherwise() {
        let mut changes = vec![
            change("vip", "u1", json!(true)),
            change("vip", "u2", json!(false)),
            change("churn", "u3", json!(true)),
            change("vip", "u4", Value::Null),
        ];
        for change in &mut changes {
            change.audience = Some(change.definition_key.clone());
        }
        let calls = plan_list_changes(&changes);
        let described: Vec<Vec<(String, AudienceAction, String)>> = calls
            .iter()
            .map(|call| {
                call.iter()
                    .map(|p| (p.audience.clone(), p.change.action, p.change.id.clone()))
                    .collect()
            })
            .collect();
        assert_eq!(
            described,
            vec![
                vec![("churn".into(), AudienceAction::Add, "u3".into())],
                vec![
                    ("vip".into(), AudienceAction::Add, "u1".into()),
                    ("vip".into(), AudienceAction::Remove, "u2".into()),
                    ("vip".into(), AudienceAction::Remove, "u4".into()),
                ],
            ]
        );
    }

    #[test]
    fn typed_attribute_names_match_their_key() {
        assert!(attribute_matches("date(signup)", "signup"));
        assert!(attribute_matches("signup", "date(signup)"));
        assert!(!attribute_matches("plan", "signup"));
    }
}
