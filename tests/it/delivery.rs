//! Delivery under failure: flaky servers, aborted runs, refused operations, wrong keys, deadlines.

use std::time::Duration;

use engage_sync::batch::emulator::Faults;
use engage_sync::sync::RunOutcome;
use serde_json::json;

use crate::harness::{audience, ids, sync, values_by_user, TestEnv};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_30_percent_500s_and_429s_the_state_ends_exact() {
    let env = TestEnv::new().await;
    env.emulator.set_faults(Faults {
        fail_500: 0.3,
        fail_429: 0.2,
        fail_after_apply: 0.05,
        seed: Some(4),
        ..Faults::default()
    });
    let members = ids("u", 0..3000);
    env.set_members("m", &members).await;
    let app = env.app(&audience("Members", "m")).await;
    let report = sync(&app).await;
    assert!(report.is_success(), "{:?}", report.failure_reason());
    assert!(report.delivery.retries > 0, "the faults were exercised");

    let mut next = members[400..].to_vec();
    next.extend(ids("n", 0..300));
    env.set_members("m", &next).await;
    let report = sync(&app).await;
    assert!(report.is_success(), "{:?}", report.failure_reason());
    assert!(report.delivery.retries > 0);

    next.sort();
    assert_eq!(env.emulator.custom_ids_with("members", &json!(true)), next);
    assert_eq!(
        env.emulator.custom_ids_with("members", &json!(false)),
        members[..400].to_vec()
    );
    assert_eq!(env.snapshot("members").await, next);
    assert_eq!(env.outbox_len().await, 0);
    let stats = env.emulator.stats();
    assert!(stats.statuses.get(&500).copied().unwrap_or(0) > 0);
    assert!(stats.statuses.get(&429).copied().unwrap_or(0) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_aborted_mid_delivery_converges_on_rerun() {
    let mut env = TestEnv::new().await;
    // A slow incremental lane, so the abort lands mid-delivery.
    env.delivery = "rate_per_second = 250\nburst = 200\nworkers = 1".into();
    let members = ids("u", 0..500);
    env.set_members("m", &members).await;
    let app = env.app(&audience("Members", "m")).await;
    assert!(sync(&app).await.is_success());
    env.take_recorded();

    let next = ids("n", 0..1000);
    env.set_members("m", &next).await;
    let app = std::sync::Arc::new(app);
    let running = {
        let app = std::sync::Arc::clone(&app);
        tokio::spawn(async move { sync(&app).await })
    };
    env.wait_for_recorded(300).await;
    running.abort();
    let _ = running.await;
    let pending = env.outbox_len().await;
    assert!(pending > 0, "the abort left work behind");

    let report = sync(&app).await;
    assert!(report.is_success(), "{:?}", report.failure_reason());
    env.assert_converged("members", &next, &members).await;
    // Nothing is lost; a value may be re-sent only if its acknowledgement was lost in the abort.
    let sent = values_by_user(&env.take_recorded(), "members");
    assert_eq!(sent.len(), 1500);
    let resent = sent.values().filter(|values| values.len() > 1).count();
    assert!(
        resent <= 200,
        "at most one in-flight call is re-sent, got {resent}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_operation_is_isolated_recorded_and_not_resent() {
    let env = TestEnv::new().await;
    env.set_members("m", &ids("u", 0..10)).await;
    let app = env.app(&audience("Members", "m")).await;
    assert!(sync(&app).await.is_success());
    env.take_recorded();

    env.emulator.set_faults(Faults {
        refuse_custom_ids: ["bad-1".to_owned()].into(),
        drop_attributes_of: ["drop-1".to_owned()].into(),
        ..Faults::default()
    });
    let mut next = ids("u", 0..10);
    next.extend(ids("v", 0..150));
    next.push("bad-1".into());
    next.push("drop-1".into());
    env.set_members("m", &next).await;
    let report = sync(&app).await;
    assert!(
        report.is_success(),
        "refused changes count as settled: {:?}",
        report.failure_reason()
    );
    assert_eq!(report.delivery.rejected, 2);
    assert!(
        report.delivery.split_calls > 0,
        "the refused call was split"
    );
    assert_eq!(
        env.emulator.custom_ids_with("members", &json!(true)).len(),
        160
    );
    assert!(env.emulator.profile("bad-1").is_none());

    let rejections: Vec<(String, String)> = sqlx::query_as(
        "SELECT custom_id, reason FROM rejections WHERE definition_key = 'members' ORDER BY custom_id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(rejections.len(), 2);
    assert_eq!(rejections[0].0, "bad-1");
    assert!(
        rejections[0].1.contains("HTTP 400") && rejections[0].1.contains("refused"),
        "{}",
        rejections[0].1
    );
    assert_eq!(rejections[1].0, "drop-1");
    assert!(rejections[1].1.contains("injected"), "{}", rejections[1].1);

    // The same values are held back on the next sync, not sent again.
    env.take_recorded();
    let report = sync(&app).await;
    assert!(report.is_success());
    assert_eq!(report.definitions[0].held_back, 2);
    assert!(env.take_recorded().is_empty());
    assert!(
        env.emulator
            .stats()
            .statuses
            .get(&400)
            .copied()
            .unwrap_or(0)
            > 0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_keys_stop_at_once_and_mark_nothing_delivered() {
    let env = TestEnv::new().await;
    env.set_members("m", &ids("u", 0..50)).await;
    let text = env.config_text(&audience("Members", "m")).replace(
        &format!("rest_api_key = \"{}\"", env.emulator.config().rest_api_key),
        "rest_api_key = \"wrong-secret-key\"",
    );
    let config =
        engage_sync::config::Config::parse(&text, std::path::Path::new("t.toml"), |_| None)
            .unwrap();
    let app = engage_sync::sync::App::connect(config).await.unwrap();
    let started = std::time::Instant::now();
    let report = sync(&app).await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "no retrying on 401"
    );
    assert!(!report.is_success());
    assert_eq!(report.definitions[0].outcome, RunOutcome::Failed);
    let reason = report.failure_reason().unwrap();
    assert!(reason.contains("401"), "{reason}");
    assert!(!reason.contains("wrong-secret-key"));
    assert!(env.snapshot("members").await.is_empty());
    assert_eq!(env.outbox_len().await, 50);
    let claimed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE claimed_by IS NOT NULL")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(claimed, 0, "claims are given back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_deadline_the_rest_waits_in_the_outbox_for_the_next_run() {
    let mut env = TestEnv::new().await;
    env.delivery = "deadline_seconds = 2".into();
    env.set_members("m", &ids("u", 0..40)).await;
    env.emulator.set_faults(Faults {
        fail_500: 1.0,
        ..Faults::default()
    });
    let app = env.app(&audience("Members", "m")).await;
    let report = sync(&app).await;
    assert!(!report.is_success());
    assert_eq!(report.definitions[0].outcome, RunOutcome::Incomplete);
    let reason = report.failure_reason().unwrap();
    assert!(
        reason.contains("40 change(s) still pending") && reason.contains("HTTP 500"),
        "{reason}"
    );
    assert_eq!(env.outbox_len().await, 40);
    let last_error: Option<String> = sqlx::query_scalar("SELECT last_error FROM outbox LIMIT 1")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert!(last_error.unwrap().contains("500"));

    env.emulator.set_faults(Faults::default());
    let report = sync(&app).await;
    assert!(report.is_success());
    assert_eq!(env.snapshot("members").await.len(), 40);
    assert_eq!(
        env.emulator.custom_ids_with("members", &json!(true)).len(),
        40
    );
}
