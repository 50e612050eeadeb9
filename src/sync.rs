//! One pass over the definitions: register them, stage and diff each one in its own transaction,
//! deliver the outbox, and record how each run ended.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;
use tracing::{error, info, warn};

use crate::batch::client::BatchClient;
use crate::config::{Config, Definition};
use crate::db;
use crate::deliver::{
    self, plan_list_changes, plan_operations, Deliverer, DeliveryTotals, DrainEnd,
};
use crate::diff::{self, DiffReport, Forms};
use crate::outbox::{ClaimedChange, Lane};
use crate::source::{self, Source, StageReport};

/// The connections a sync needs, built once from the configuration.
pub struct App {
    pub config: Config,
    pub pool: PgPool,
    pub source_pool: Option<PgPool>,
    pub client: Arc<BatchClient>,
}

impl App {
    pub async fn connect(config: Config) -> anyhow::Result<Self> {
        let pool = db::connect(&config.database, "state").await?;
        let source_pool = match &config.source {
            Some(settings) => Some(db::connect(settings, "source").await?),
            None => None,
        };
        let client = Arc::new(BatchClient::new(&config.batch)?);
        Ok(Self {
            config,
            pool,
            source_pool,
            client,
        })
    }

    fn source(&self) -> Source<'_> {
        match &self.source_pool {
            Some(pool) => Source::Other(pool),
            None => Source::StateDatabase,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct SyncOptions {
    /// Only these definition keys (all when empty).
    pub only: Vec<String>,
    /// Compute and print the changes; send nothing and keep no state.
    pub dry_run: bool,
    /// How many operations a dry run shows.
    pub preview_limit: usize,
}

/// How one definition's part of the pass went.
#[derive(Debug, Clone, Serialize)]
pub struct DefinitionOutcome {
    pub key: String,
    pub run_id: Option<i64>,
    pub source_rows: i64,
    pub skipped_rows: i64,
    pub duplicate_rows: i64,
    pub added: i64,
    pub removed: i64,
    pub changed: i64,
    pub held_back: i64,
    pub lane: Option<&'static str>,
    /// Changes of this definition still in the outbox after delivery.
    pub pending: i64,
    pub outcome: RunOutcome,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunOutcome {
    Succeeded,
    Incomplete,
    Failed,
    DryRun,
}

impl RunOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            RunOutcome::Succeeded => "succeeded",
            RunOutcome::Incomplete => "incomplete",
            RunOutcome::Failed => "failed",
            RunOutcome::DryRun => "dry_run",
        }
    }
}

#[derive(Debug, Clone)]
pub struct SyncReport {
    pub definitions: Vec<DefinitionOutcome>,
    pub delivery: DeliveryTotals,
    pub drain: Option<DrainEnd>,
    /// The first operations a dry run would send.
    pub preview: Vec<Value>,
    pub elapsed: Duration,
    pub diff_elapsed: Duration,
    pub delivery_elapsed: Duration,
}

impl SyncReport {
    /// Every change acknowledged or recorded as rejected, every query ran.
    pub fn is_success(&self) -> bool {
        self.failure_reason().is_none()
    }

    /// One line saying why the pass did not succeed.
    pub fn failure_reason(&self) -> Option<String> {
        if let Some(DrainEnd::Fatal { reason }) = &self.drain {
            return Some(reason.clone());
        }
        let failed: Vec<String> = self
            .definitions
            .iter()
            .filter(|d| d.outcome == RunOutcome::Failed)
            .map(|d| d.error.clone().unwrap_or_else(|| d.key.clone()))
            .collect();
        if !failed.is_empty() {
            return Some(failed.join("; "));
        }
        if let Some(DrainEnd::Incomplete {
            pending,
            last_error,
        }) = &self.drain
        {
            return Some(format!(
                "{pending} change(s) still pending when delivery ended (deadline passed or stop requested; last error: {}); \
                 they stay in the outbox for the next run",
                last_error.as_deref().unwrap_or("none")
            ));
        }
        let unfinished: Vec<String> = self
            .definitions
            .iter()
            .filter(|d| !matches!(d.outcome, RunOutcome::Succeeded | RunOutcome::DryRun))
            .map(|d| {
                d.error
                    .clone()
                    .unwrap_or_else(|| format!("{}: unfinished", d.key))
            })
            .collect();
        (!unfinished.is_empty()).then(|| unfinished.join("; "))
    }
}

/// Registers every configured definition (new ones, edited names, queries or schedules).
pub async fn register_definitions(pool: &PgPool, definitions: &[Definition]) -> anyhow::Result<()> {
    let mut conn = pool.acquire().await?;
    for definition in definitions {
        register_definition(&mut conn, definition).await?;
    }
    Ok(())
}

async fn register_definition(
    conn: &mut sqlx::PgConnection,
    definition: &Definition,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO definitions (key, kind, name, query, schedule) VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (key) DO UPDATE SET kind = EXCLUDED.kind, name = EXCLUDED.name, \
             query = EXCLUDED.query, schedule = EXCLUDED.schedule, last_seen_at = now()",
    )
    .bind(definition.key.as_str())
    .bind(definition.kind.as_str())
    .bind(&definition.name)
    .bind(&definition.query)
    .bind(&definition.schedule_expression)
    .execute(conn)
    .await?;
    Ok(())
}

/// Picks the definitions `--only` names, or all of them; an unknown key is an error listing the
/// known ones.
pub fn select_definitions<'a>(
    config: &'a Config,
    only: &[String],
) -> anyhow::Result<Vec<&'a Definition>> {
    if only.is_empty() {
        return Ok(config.definitions.iter().collect());
    }
    only.iter()
        .map(|key| {
            config.definition(key).ok_or_else(|| {
                let known: Vec<&str> = config.definitions.iter().map(|d| d.key.as_str()).collect();
                anyhow::anyhow!(
                    "no definition has the key {key:?}; known keys: {}",
                    if known.is_empty() {
                        "(none)".to_owned()
                    } else {
                        known.join(", ")
                    }
                )
            })
        })
        .collect()
}

/// One pass: diff every selected definition, then deliver (unless dry run).
pub async fn sync_once(app: &App, options: &SyncOptions) -> anyhow::Result<SyncReport> {
    let started = Instant::now();
    db::ensure_migrated(&app.pool).await?;
    let selected = select_definitions(&app.config, &options.only)?;
    if !options.dry_run {
        register_definitions(&app.pool, &app.config.definitions).await?;
    }

    let mut outcomes = Vec::with_capacity(selected.len());
    let mut preview = Vec::new();
    for definition in &selected {
        let outcome = if options.dry_run {
            dry_run_definition(
                app,
                definition,
                options.preview_limit.saturating_sub(preview.len()),
                &mut preview,
            )
            .await
        } else {
            diff_definition(app, definition, PassMode::Diff).await
        };
        outcomes.push(outcome);
    }
    let diff_elapsed = started.elapsed();

    let delivery_started = Instant::now();
    let mut delivery = DeliveryTotals::default();
    let mut drain = None;
    if !options.dry_run {
        let only = (!options.only.is_empty()).then(|| {
            selected
                .iter()
                .map(|d| d.key.as_str().to_owned())
                .collect::<Vec<_>>()
        });
        let (totals, end) = deliver_and_close(app, &mut outcomes, only).await?;
        delivery = totals;
        drain = Some(end);
    }

    Ok(SyncReport {
        definitions: outcomes,
        delivery,
        drain,
        preview,
        elapsed: started.elapsed(),
        diff_elapsed,
        delivery_elapsed: delivery_started.elapsed(),
    })
}

fn empty_outcome(key: &str) -> DefinitionOutcome {
    DefinitionOutcome {
        key: key.to_owned(),
        run_id: None,
        source_rows: 0,
        skipped_rows: 0,
        duplicate_rows: 0,
        added: 0,
        removed: 0,
        changed: 0,
        held_back: 0,
        lane: None,
        pending: 0,
        outcome: RunOutcome::Failed,
        error: None,
    }
}

fn fill(outcome: &mut DefinitionOutcome, stage: &StageReport, diff: &DiffReport) {
    outcome.source_rows = stage.source_rows;
    outcome.skipped_rows = stage.skipped_rows;
    outcome.duplicate_rows = stage.duplicate_rows;
    outcome.added = diff.added;
    outcome.removed = diff.removed;
    outcome.changed = diff.changed;
    outcome.held_back = diff.held_back;
    outcome.lane = diff.lane.map(|lane| lane.as_str());
}

/// What a pass does with a definition's staged rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PassMode {
    /// Send the difference from the snapshot.
    Diff,
    /// Send every member again through the bulk lane (`backfill`).
    Backfill,
}

/// Stages and diffs one definition in one transaction; the run row is written outside it so a
/// failure is recorded too.
pub(crate) async fn diff_definition(
    app: &App,
    definition: &Definition,
    mode: PassMode,
) -> DefinitionOutcome {
    let key = definition.key.as_str();
    let mut outcome = empty_outcome(key);
    let run_id: i64 =
        match sqlx::query_scalar("INSERT INTO runs (definition_key) VALUES ($1) RETURNING id")
            .bind(key)
            .fetch_one(&app.pool)
            .await
        {
            Ok(id) => id,
            Err(error) => {
                outcome.error = Some(format!("{key}: cannot record the run: {error}"));
                return outcome;
            }
        };
    outcome.run_id = Some(run_id);
    let started = Instant::now();

    // How long the query (into staging) and the diff took, for logs and benchmarks.
    let mut query_elapsed = Duration::ZERO;
    let mut diff_elapsed = Duration::ZERO;
    let result: anyhow::Result<(StageReport, DiffReport)> = async {
        if let Some(audience) = &definition.custom_audience {
            ensure_custom_audience(app, definition, audience).await?;
        }
        let mut tx = app.pool.begin().await?;
        let query_started = Instant::now();
        let stage = source::stage(&mut tx, app.source(), definition).await?;
        query_elapsed = query_started.elapsed();
        let diff_started = Instant::now();
        let forms = Forms::of(definition, &stage.attribute);
        // Kept so `retire` can undo the definition once it left the configuration.
        sqlx::query("UPDATE definitions SET attribute = $2, custom_audience = $3 WHERE key = $1")
            .bind(key)
            .bind(forms.attribute.as_deref())
            .bind(forms.audience.as_deref())
            .execute(&mut *tx)
            .await?;
        let diff = match mode {
            PassMode::Diff => {
                diff::diff_into_outbox(
                    &mut tx,
                    definition,
                    &stage,
                    &forms,
                    app.config.delivery.bulk_threshold,
                )
                .await?
            }
            PassMode::Backfill => {
                diff::enqueue_all_members(&mut tx, definition.key.as_str(), &forms).await?;
                DiffReport {
                    added: stage.staged,
                    lane: Some(crate::outbox::Lane::Bulk),
                    ..DiffReport::default()
                }
            }
        };
        diff_elapsed = diff_started.elapsed();
        sqlx::query(
            "UPDATE runs SET lane = $2, source_rows = $3, skipped_rows = $4, duplicate_rows = $5, \
                 added = $6, removed = $7, changed = $8 WHERE id = $1",
        )
        .bind(run_id)
        .bind(diff.lane.map(|lane| lane.as_str()))
        .bind(stage.source_rows)
        .bind(stage.skipped_rows)
        .bind(stage.duplicate_rows)
        .bind(diff.added)
        .bind(diff.removed)
        .bind(diff.changed)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok((stage, diff))
    }
    .await;

    match result {
        Ok((stage, diff)) => {
            fill(&mut outcome, &stage, &diff);
            outcome.outcome = RunOutcome::Incomplete;
            log_stage(definition, &stage);
            info!(
                definition = %key,
                added = diff.added,
                removed = diff.removed,
                changed = diff.changed,
                held_back = diff.held_back,
                lane = diff.lane.map(|l| l.as_str()).unwrap_or("-"),
                query_ms = query_elapsed.as_millis() as u64,
                diff_ms = diff_elapsed.as_millis() as u64,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "Computed changes."
            );
        }
        Err(failure) => {
            let message = format!("{failure:#}");
            error!(definition = %key, error = %message, "The definition's run failed.");
            let _ = sqlx::query(
                "UPDATE runs SET outcome = 'failed', error = $2, finished_at = now() WHERE id = $1",
            )
            .bind(run_id)
            .bind(&message)
            .execute(&app.pool)
            .await;
            outcome.error = Some(message);
        }
    }
    outcome
}

/// Creates the definition's custom audience on Batch the first time (`/audiences/create`).
async fn ensure_custom_audience(
    app: &App,
    definition: &Definition,
    audience: &str,
) -> anyhow::Result<()> {
    let created: bool = sqlx::query_scalar(
        "SELECT custom_audience_created_at IS NOT NULL AND custom_audience = $2 \
         FROM definitions WHERE key = $1",
    )
    .bind(definition.key.as_str())
    .bind(audience)
    .fetch_optional(&app.pool)
    .await?
    .flatten()
    .unwrap_or(false);
    if created {
        return Ok(());
    }
    app.client
        .create_audience(audience, &definition.name)
        .await
        .map_err(|reason| {
            anyhow::anyhow!("creating custom audience \"{audience}\" on Batch: {reason}")
        })?;
    sqlx::query(
        "UPDATE definitions SET custom_audience = $2, custom_audience_created_at = now() \
         WHERE key = $1",
    )
    .bind(definition.key.as_str())
    .bind(audience)
    .execute(&app.pool)
    .await?;
    info!(definition = %definition.key, audience, "Created the custom audience on Batch.");
    Ok(())
}

fn log_stage(definition: &Definition, stage: &StageReport) {
    if stage.invalid_values > 0 {
        warn!(
            definition = %definition.key,
            refused = stage.invalid_values,
            examples = %stage.invalid_samples.join("; "),
            "Values Batch would refuse were recorded in rejections and not sent."
        );
    }
    if stage.skipped_rows > 0 {
        warn!(
            definition = %definition.key,
            skipped = stage.skipped_rows,
            examples = %stage.skipped_samples.join("; "),
            "Skipped rows without a usable user id (NULL, empty or over 512 characters)."
        );
    }
    if stage.duplicate_rows > 0 {
        info!(
            definition = %definition.key,
            duplicates = stage.duplicate_rows,
            "Collapsed duplicate user ids."
        );
    }
}

/// Diffs inside a transaction that is rolled back, and reads the operations it would send.
async fn dry_run_definition(
    app: &App,
    definition: &Definition,
    preview_room: usize,
    preview: &mut Vec<Value>,
) -> DefinitionOutcome {
    let key = definition.key.as_str();
    let mut outcome = empty_outcome(key);
    let result: anyhow::Result<(StageReport, DiffReport, Vec<Value>)> = async {
        let mut tx = app.pool.begin().await?;
        // Rolled back with the rest: a dry run leaves no trace.
        register_definition(&mut tx, definition).await?;
        let stage = source::stage(&mut tx, app.source(), definition).await?;
        let forms = Forms::of(definition, &stage.attribute);
        let diff = diff::diff_into_outbox(
            &mut tx,
            definition,
            &stage,
            &forms,
            app.config.delivery.bulk_threshold,
        )
        .await?;
        let changes: Vec<ClaimedChange> = sqlx::query_as(
            "SELECT definition_key, custom_id, attribute, value, event, audience, seq FROM outbox \
             WHERE definition_key = $1 ORDER BY custom_id LIMIT $2",
        )
        .bind(key)
        .bind(preview_room as i64)
        .fetch_all(&mut *tx)
        .await?;
        // The preview shows profile operations as `/profiles/update` would carry them, and list
        // changes as `/audiences/update` bodies.
        let mut operations = plan_operations(&changes, Lane::Incremental)
            .into_iter()
            .filter(|planned| {
                !planned.operation.attributes.is_empty() || !planned.operation.events.is_empty()
            })
            .map(|planned| serde_json::to_value(planned.operation))
            .collect::<Result<Vec<_>, _>>()?;
        for call in plan_list_changes(&changes) {
            let ids: Vec<_> = call.iter().map(|planned| &planned.change).collect();
            operations.push(serde_json::json!({"audience": call[0].audience, "ids": ids}));
        }
        tx.rollback().await?;
        Ok((stage, diff, operations))
    }
    .await;
    match result {
        Ok((stage, diff, operations)) => {
            fill(&mut outcome, &stage, &diff);
            outcome.outcome = RunOutcome::DryRun;
            log_stage(definition, &stage);
            preview.extend(operations);
        }
        Err(failure) => outcome.error = Some(format!("{failure:#}")),
    }
    outcome
}

/// Drains the outbox (for `only`, or everything) and closes each run by what is left.
async fn deliver_and_close(
    app: &App,
    outcomes: &mut [DefinitionOutcome],
    only: Option<Vec<String>>,
) -> anyhow::Result<(DeliveryTotals, DrainEnd)> {
    let started = Instant::now();
    let deliverer = Arc::new(Deliverer::new(
        app.pool.clone(),
        Arc::clone(&app.client),
        app.config.delivery.clone(),
    ));
    let end = match deliverer
        .drain(only, Instant::now() + app.config.delivery.deadline)
        .await
    {
        Ok(end) => end,
        Err(failure) => {
            // The database failed under delivery: close the runs before reporting it.
            let reason = format!("delivery failed: {failure:#}");
            let _ = finish_runs(&app.pool, outcomes, &DrainEnd::Fatal { reason }).await;
            return Err(failure);
        }
    };
    let totals = deliverer.stats.totals();
    deliver::log_totals(&totals, started.elapsed());
    finish_runs(&app.pool, outcomes, &end).await?;
    Ok((totals, end))
}

/// Drains everything pending in the outbox (for `replay`, which has no run to close).
pub async fn deliver_pending(app: &App) -> anyhow::Result<(DeliveryTotals, DrainEnd)> {
    deliver_and_close(app, &mut [], None).await
}

/// `backfill KEY`: stage the definition and send every current member again through the bulk
/// lane (recovery after data loss on Batch's side); non-members get nothing.
pub async fn backfill(app: &App, key: &str) -> anyhow::Result<SyncReport> {
    let started = Instant::now();
    db::ensure_migrated(&app.pool).await?;
    let definition = select_definitions(&app.config, &[key.to_owned()])?[0];
    register_definitions(&app.pool, &app.config.definitions).await?;
    let mut outcomes = vec![diff_definition(app, definition, PassMode::Backfill).await];
    let diff_elapsed = started.elapsed();
    let delivery_started = Instant::now();
    let (delivery, end) = deliver_and_close(app, &mut outcomes, Some(vec![key.to_owned()])).await?;
    Ok(SyncReport {
        definitions: outcomes,
        delivery,
        drain: Some(end),
        preview: Vec::new(),
        elapsed: started.elapsed(),
        diff_elapsed,
        delivery_elapsed: delivery_started.elapsed(),
    })
}

/// What `retire` did.
#[derive(Debug, Clone)]
pub struct RetireReport {
    /// Profiles that held the attribute (per the snapshot).
    pub profiles: i64,
    pub delivery: DeliveryTotals,
    pub end: DrainEnd,
}

/// `retire KEY`: deletes a removed definition's attribute (null) from every profile holding it,
/// then forgets the definition. Refuses a key still in the configuration.
pub async fn retire(app: &App, key: &str) -> anyhow::Result<RetireReport> {
    db::ensure_migrated(&app.pool).await?;
    let key = crate::domain::AttributeKey::parse(key)
        .map_err(|error| anyhow::anyhow!("{key:?} is not a definition key: it {error}"))?;
    let key = key.as_str();
    if app.config.definition(key).is_some() {
        anyhow::bail!(
            "{key} is still in the configuration; remove its definition first, then retire it"
        );
    }
    let known: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM definitions WHERE key = $1) \
             OR EXISTS (SELECT 1 FROM snapshot WHERE definition_key = $1)",
    )
    .bind(key)
    .fetch_one(&app.pool)
    .await?;
    if !known {
        anyhow::bail!("no definition with the key {key} has ever been synced here");
    }
    // How the definition reached Batch, as recorded by its last run (older rows: the attribute).
    let (attribute, audience): (Option<String>, Option<String>) =
        sqlx::query_as("SELECT attribute, custom_audience FROM definitions WHERE key = $1")
            .bind(key)
            .fetch_optional(&app.pool)
            .await?
            .unwrap_or((Some(key.to_owned()), None));
    let forms = Forms {
        attribute,
        event: None,
        audience,
    };
    let mut tx = app.pool.begin().await?;
    let profiles =
        diff::enqueue_retirement(&mut tx, key, &forms, app.config.delivery.bulk_threshold).await?;
    tx.commit().await?;
    info!(definition = %key, profiles, "Retiring: deleting the attribute from every profile holding it.");

    // No run rows: a retired definition has no runs left to close.
    let (delivery, end) = deliver_and_close(app, &mut [], Some(vec![key.to_owned()])).await?;
    if end == DrainEnd::Complete {
        let mut tx = app.pool.begin().await?;
        for table in ["snapshot", "rejections", "outbox"] {
            sqlx::query(&format!("DELETE FROM {table} WHERE definition_key = $1"))
                .bind(key)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("DELETE FROM definitions WHERE key = $1")
            .bind(key)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
    }
    Ok(RetireReport {
        profiles,
        delivery,
        end,
    })
}

/// Closes each run by what delivery left of its changes.
pub(crate) async fn finish_runs(
    pool: &PgPool,
    outcomes: &mut [DefinitionOutcome],
    end: &DrainEnd,
) -> anyhow::Result<()> {
    for outcome in outcomes.iter_mut() {
        let Some(run_id) = outcome.run_id else {
            continue;
        };
        if outcome.error.is_some() {
            continue;
        }
        outcome.pending =
            sqlx::query_scalar("SELECT count(*) FROM outbox WHERE definition_key = $1")
                .bind(&outcome.key)
                .fetch_one(pool)
                .await?;
        let (state, error) = if outcome.pending == 0 {
            (RunOutcome::Succeeded, None)
        } else {
            let why = match end {
                DrainEnd::Fatal { reason } => reason.clone(),
                DrainEnd::Incomplete { last_error, .. } => format!(
                    "{} change(s) pending at the deadline; last error: {}",
                    outcome.pending,
                    last_error.as_deref().unwrap_or("none")
                ),
                DrainEnd::Complete => format!("{} change(s) pending", outcome.pending),
            };
            let state = if matches!(end, DrainEnd::Fatal { .. }) {
                RunOutcome::Failed
            } else {
                RunOutcome::Incomplete
            };
            (state, Some(why))
        };
        outcome.outcome = state;
        outcome.error = error.clone();
        sqlx::query("UPDATE runs SET outcome = $2, error = $3, finished_at = now() WHERE id = $1")
            .bind(run_id)
            .bind(state.as_str())
            .bind(error)
            .execute(pool)
            .await?;
        if state == RunOutcome::Succeeded {
            sqlx::query(
                "UPDATE definitions SET initial_sync_completed_at = now() \
                 WHERE key = $1 AND initial_sync_completed_at IS NULL",
            )
            .bind(&outcome.key)
            .execute(pool)
            .await?;
        }
    }
    Ok(())
}
