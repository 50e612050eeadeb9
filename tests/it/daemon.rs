//! The daemon: schedules beside a backfill, resuming after a kill, replicas, admin endpoints.

use std::time::Duration;

use serde_json::json;

use crate::harness::{ids, scheduled_audience, sync, values_by_user, RunningDaemon, TestEnv};

const EVERY_SECOND: &str = "* * * * * *";

async fn run_count(env: &TestEnv, key: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM runs WHERE definition_key = $1 AND outcome = 'succeeded'",
    )
    .bind(key)
    .fetch_one(&env.pool)
    .await
    .unwrap()
}

async fn wait_until(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> bool) {
    let started = tokio::time::Instant::now();
    while !check().await {
        assert!(started.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frequent_audience_keeps_its_schedule_during_a_backfill() {
    let mut env = TestEnv::new().await;
    // A backfill slow enough to watch: 60,000 members at 8,000 profiles/s.
    env.delivery = "bulk_rate_per_second = 8000".into();
    let small = scheduled_audience("Small", "small", EVERY_SECOND);
    env.set_members("small", &ids("s", 0..20)).await;
    assert!(
        sync(&env.app(&small).await).await.is_success(),
        "the small audience is established"
    );
    env.set_members("big", &ids("b", 0..60_000)).await;

    let both = format!("{small}{}", scheduled_audience("Big", "big", EVERY_SECOND));
    let daemon = RunningDaemon::start(env.app(&both).await).await;
    let admin = daemon.admin.expect("admin endpoints");
    wait_until(
        "the backfill to start",
        Duration::from_secs(20),
        async || {
            env.emulator
                .stats()
                .accepted_operations
                .contains_key("profiles/mass-update")
        },
    )
    .await;

    // While the backfill runs, the small audience changes and keeps being synced.
    let runs_before = run_count(&env, "small").await;
    for round in 0..3 {
        env.set_members("small", &ids("s", 0..(21 + round))).await;
        let expected = ids("s", 0..(21 + round));
        wait_until(
            "the small audience's change",
            Duration::from_secs(10),
            async || env.emulator.custom_ids_with("small", &json!(true)) == expected,
        )
        .await;
    }
    wait_until(
        "three runs of the small audience",
        Duration::from_secs(5),
        async || run_count(&env, "small").await >= runs_before + 3,
    )
    .await;
    let big_running: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM runs WHERE definition_key = 'big' AND finished_at IS NULL)",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert!(
        big_running,
        "the backfill was still running while the small audience synced"
    );

    // The admin endpoints answer meanwhile.
    let http = reqwest::Client::new();
    let healthz = http
        .get(format!("http://{admin}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(healthz.status(), 200);
    let readyz = http
        .get(format!("http://{admin}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(readyz.status(), 200);
    let metrics = http
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for expected in [
        "engage_sync_runs_total{definition=\"small\",outcome=\"succeeded\"}",
        "engage_sync_outbox_depth{lane=\"bulk\"}",
        "engage_sync_operations_sent_total{lane=\"bulk\"}",
        "engage_sync_delivery_total{definition=\"big\"} 60000",
        "engage_sync_seconds_since_last_success{definition=\"small\"}",
        "# TYPE engage_sync_rate_limited_total counter",
    ] {
        assert!(
            metrics.contains(expected),
            "{expected} missing from:\n{metrics}"
        );
    }

    wait_until(
        "the backfill to finish",
        Duration::from_secs(60),
        async || env.snapshot("big").await.len() == 60_000,
    )
    .await;
    daemon.stop().await.unwrap();
    let recorded = env.take_recorded();
    let big_ops: Vec<_> = recorded
        .iter()
        .filter(|op| op.attributes.contains_key("big"))
        .collect();
    let through_bulk = big_ops
        .iter()
        .filter(|op| op.endpoint == "profiles/mass-update")
        .count();
    assert_eq!(
        through_bulk, 60_000,
        "the backfill went through mass-update"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_mid_backfill_resumes_without_resending_acknowledged_chunks() {
    let mut env = TestEnv::new().await;
    env.delivery = "bulk_rate_per_second = 10000\nworkers = 1".into();
    let members = ids("u", 0..60_000);
    env.set_members("m", &members).await;
    let definition = scheduled_audience("Members", "m", EVERY_SECOND);
    let config = env.config(&definition);

    // The first daemon runs in a runtime of its own, shut down abruptly: every task vanishes
    // mid-flight, as with kill -9.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.spawn(async move {
        let app = engage_sync::sync::App::connect(config).await.unwrap();
        let _ = engage_sync::daemon::run(app, std::future::pending(), Default::default()).await;
    });
    wait_until(
        "two acknowledged chunks",
        Duration::from_secs(30),
        async || env.snapshot("members").await.len() >= 20_000,
    )
    .await;
    runtime.shutdown_background();
    // A killed process's sockets close and PostgreSQL ends its sessions, releasing their locks and
    // rolling back an open claim. A dropped runtime may leave a pooled connection alive instead,
    // so end the dead daemon's sessions as the kernel would (it is the only engage-sync client),
    // and wait until they are gone, so no commit of theirs lands after the snapshot is read.
    sqlx::query(
        "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = 'engage-sync'",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let acknowledged = env.snapshot("members").await;
    assert!(acknowledged.len() < members.len(), "killed before the end");
    env.take_recorded();

    let daemon = RunningDaemon::start(env.app(&definition).await).await;
    wait_until(
        "the backfill to resume and finish",
        Duration::from_secs(120),
        async || env.snapshot("members").await.len() == members.len(),
    )
    .await;
    daemon.stop().await.unwrap();
    let resent = values_by_user(&env.take_recorded(), "members");
    let acknowledged: std::collections::HashSet<&String> = acknowledged.iter().collect();
    assert!(
        resent.keys().all(|id| !acknowledged.contains(id)),
        "an acknowledged chunk was sent again"
    );
    assert_eq!(resent.len(), members.len() - acknowledged.len());
    env.assert_converged("members", &members, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_never_run_one_definition_at_once_and_deliver_each_change_once() {
    let env = TestEnv::new().await;
    let definitions: String = ["a", "b", "c"]
        .iter()
        .map(|name| scheduled_audience(&format!("Audience {name}"), name, EVERY_SECOND))
        .collect();
    for name in ["a", "b", "c"] {
        env.set_members(name, &ids("u", 0..50)).await;
    }
    let first = RunningDaemon::start(env.app(&definitions).await).await;
    let second = RunningDaemon::start(env.app(&definitions).await).await;

    let mut expected = Vec::new();
    for round in 1..=4usize {
        tokio::time::sleep(Duration::from_millis(1200)).await;
        expected = ids("u", (round * 10)..(50 + round * 10));
        for name in ["a", "b", "c"] {
            env.set_members(name, &expected).await;
        }
    }
    for key in ["audience_a", "audience_b", "audience_c"] {
        wait_until("the last change", Duration::from_secs(20), async || {
            env.emulator.custom_ids_with(key, &json!(true)) == expected
        })
        .await;
    }
    first.stop().await.unwrap();
    second.stop().await.unwrap();

    let runs: Vec<(String, chrono::DateTime<chrono::Utc>, Option<chrono::DateTime<chrono::Utc>>)> =
        sqlx::query_as("SELECT definition_key, started_at, finished_at FROM runs ORDER BY definition_key, started_at")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert!(runs.len() >= 9, "several runs each: {}", runs.len());
    for pair in runs.windows(2) {
        let (key, _, finished) = &pair[0];
        let (next_key, next_started, _) = &pair[1];
        if key == next_key {
            let finished = finished.expect("runs finish");
            assert!(finished <= *next_started, "two runs of {key} overlapped");
        }
    }
    let recorded = env.take_recorded();
    for key in ["audience_a", "audience_b", "audience_c"] {
        for (user, values) in values_by_user(&recorded, key) {
            assert!(
                values.windows(2).all(|pair| pair[0] != pair[1]),
                "{user} got the same {key} value twice: {values:?}"
            );
        }
        assert_eq!(env.snapshot(key).await, expected);
    }
}
