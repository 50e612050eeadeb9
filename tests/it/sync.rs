//! Sync semantics: first sync, churn, no-op, bundling, bad rows, edited queries, other sources.

use engage_sync::sync::{sync_once, RunOutcome, SyncOptions};
use serde_json::json;
use sqlx::Executor;

use crate::harness::{audience, ids, sync, values_by_user, TestEnv};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_sync_sends_each_member_true_once_then_only_changes() {
    let env = TestEnv::new().await;
    let members = ids("u", 0..1200);
    env.set_members("buyers", &members).await;
    let app = env
        .app(&audience("Order Completed Last 30 Days", "buyers"))
        .await;
    let key = "order_completed_last_30_days";

    let report = sync(&app).await;
    assert!(report.is_success(), "{:?}", report.failure_reason());
    assert_eq!(report.definitions[0].added, 1200);
    let recorded = env.take_recorded();
    let sent = values_by_user(&recorded, key);
    assert_eq!(sent.len(), 1200);
    assert!(
        sent.values().all(|values| values == &vec![json!(true)]),
        "each member gets true exactly once"
    );
    assert!(
        recorded
            .iter()
            .all(|op| op.endpoint == "profiles/mass-update"),
        "the first sync is a bulk job"
    );
    assert_eq!(env.snapshot(key).await, members);
    assert_eq!(env.outbox_len().await, 0);

    // Churn: 100 leave, 150 enter.
    let mut next: Vec<String> = members[100..].to_vec();
    next.extend(ids("new", 0..150));
    env.set_members("buyers", &next).await;
    let report = sync(&app).await;
    assert!(report.is_success());
    assert_eq!(
        (report.definitions[0].added, report.definitions[0].removed),
        (150, 100)
    );
    let recorded = env.take_recorded();
    let sent = values_by_user(&recorded, key);
    assert_eq!(sent.len(), 250, "only changed users are sent");
    for id in &members[..100] {
        assert_eq!(sent[id], vec![json!(false)], "{id} left");
        assert_eq!(
            env.emulator.profile(id).unwrap().attributes[key],
            json!(false)
        );
    }
    for id in ids("new", 0..150) {
        assert_eq!(sent[&id], vec![json!(true)], "{id} entered");
    }
    assert!(
        recorded.iter().all(|op| op.endpoint == "profiles/update"),
        "later syncs are incremental"
    );
    next.sort();
    assert_eq!(env.snapshot(key).await, next);

    // Nothing changed: nothing is sent.
    let requests_before = env.emulator.stats().requests.values().sum::<u64>();
    let report = sync(&app).await;
    assert!(report.is_success());
    assert_eq!(
        report.definitions[0].added + report.definitions[0].removed,
        0
    );
    assert!(env.take_recorded().is_empty());
    assert_eq!(
        env.emulator.stats().requests.values().sum::<u64>(),
        requests_before
    );
    assert_eq!(report.delivery.requests, 0);

    let members_on_batch = env.emulator.custom_ids_with(key, &json!(true));
    assert_eq!(members_on_batch, next);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_users_audiences_travel_in_one_operation() {
    let env = TestEnv::new().await;
    env.set_members("a", &ids("u", 0..10)).await;
    env.set_members("b", &ids("u", 5..15)).await;
    let definitions = format!(
        "{}{}",
        audience("Audience A", "a"),
        audience("Audience B", "b")
    );
    let app = env.app(&definitions).await;

    assert!(sync(&app).await.is_success());
    let recorded = env.take_recorded();
    assert_eq!(recorded.len(), 15, "one operation per user");
    let u7 = recorded.iter().find(|op| op.custom_id == "u00007").unwrap();
    assert_eq!(
        json!(u7.attributes),
        json!({"audience_a": true, "audience_b": true})
    );

    // u00007 leaves both, u00020 enters both: still one operation each, through /profiles/update.
    let mut a = ids("u", 0..10);
    a.retain(|id| id != "u00007");
    a.push("u00020".into());
    let mut b = ids("u", 5..15);
    b.retain(|id| id != "u00007");
    b.push("u00020".into());
    env.set_members("a", &a).await;
    env.set_members("b", &b).await;
    assert!(sync(&app).await.is_success());
    let recorded = env.take_recorded();
    assert_eq!(recorded.len(), 2, "{recorded:?}");
    for op in &recorded {
        assert_eq!(op.endpoint, "profiles/update");
        let expected = op.custom_id == "u00020";
        assert_eq!(
            json!(op.attributes),
            json!({"audience_a": expected, "audience_b": expected})
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rows_are_skipped_counted_and_named_while_good_rows_go_through() {
    let env = TestEnv::new().await;
    env.pool
        .execute(
            "INSERT INTO memberships VALUES ('m', 'good-1'), ('m', NULL), ('m', ''), ('m', 'good-2'), \
             ('m', repeat('x', 600)), ('m', 'good-1'), ('m', repeat('y', 512))",
        )
        .await
        .unwrap();
    let app = env.app(&audience("Members", "m")).await;
    let report = sync(&app).await;
    assert!(report.is_success(), "bad rows do not fail the run");
    let outcome = &report.definitions[0];
    assert_eq!(
        (
            outcome.source_rows,
            outcome.skipped_rows,
            outcome.duplicate_rows
        ),
        (7, 3, 1)
    );
    assert_eq!(outcome.added, 3);
    let mut expected = vec!["good-1".to_owned(), "good-2".to_owned(), "y".repeat(512)];
    expected.sort();
    assert_eq!(env.snapshot("members").await, expected);

    let run: (i64, i64) =
        sqlx::query_as("SELECT skipped_rows, duplicate_rows FROM runs ORDER BY id DESC LIMIT 1")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(run, (3, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_query_fails_its_own_definition_only_with_a_clear_error() {
    let env = TestEnv::new().await;
    env.set_members("ok", &ids("u", 0..5)).await;
    let definitions = format!(
        "{}[[audience]]\nname = \"Broken\"\nquery = \"SELECT user_id FROM no_such_table\"\n\
         [[audience]]\nname = \"Two Columns\"\nquery = \"SELECT user_id, audience FROM memberships\"\n",
        audience("Fine", "ok")
    );
    let app = env.app(&definitions).await;
    let report = sync(&app).await;
    assert!(!report.is_success());
    let by_key = |key: &str| report.definitions.iter().find(|d| d.key == key).unwrap();
    assert_eq!(by_key("fine").outcome, RunOutcome::Succeeded);
    assert_eq!(env.snapshot("fine").await.len(), 5);
    let broken = by_key("broken");
    assert_eq!(broken.outcome, RunOutcome::Failed);
    let error = broken.error.as_deref().unwrap();
    assert!(
        error.contains("\"Broken\"") && error.contains("no_such_table"),
        "{error}"
    );
    let two = by_key("two_columns").error.as_deref().unwrap();
    assert!(
        two.contains("\"Two Columns\"") && two.contains("2 columns"),
        "{two}"
    );
    let reason = report.failure_reason().unwrap();
    assert!(reason.contains("no_such_table"), "{reason}");
    let failed: i64 = sqlx::query_scalar("SELECT count(*) FROM runs WHERE outcome = 'failed'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(failed, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_query_diffs_against_the_existing_snapshot() {
    let env = TestEnv::new().await;
    env.set_members("old", &ids("u", 0..100)).await;
    env.set_members("new", &ids("u", 90..110)).await;
    let app = env.app(&audience("Buyers", "old")).await;
    assert!(sync(&app).await.is_success());
    env.take_recorded();

    let edited = env.app(&audience("Buyers", "new")).await;
    let report = sync(&edited).await;
    assert!(report.is_success());
    assert_eq!(
        (report.definitions[0].added, report.definitions[0].removed),
        (10, 90)
    );
    assert_eq!(report.definitions[0].lane, Some("incremental"));
    assert_eq!(env.take_recorded().len(), 100);
    assert_eq!(env.snapshot("buyers").await, ids("u", 90..110));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_in_another_database_is_streamed_with_copy() {
    let env = TestEnv::new().await;
    // The "source" is a second database on the same server.
    let source_url = {
        let source_env = TestEnv::new().await;
        source_env
            .pool
            .execute("INSERT INTO memberships VALUES ('s', 'tab\tid'), ('s', 'back\\slash'), ('s', 'plain'), ('s', NULL), ('s', 'plain')")
            .await
            .unwrap();
        source_env.database_url.clone()
    };
    let text = env.config_text(&audience("Streamed", "s")).replace(
        "[batch]",
        &format!("[source]\nurl = \"{source_url}\"\n[batch]"),
    );
    let config =
        engage_sync::config::Config::parse(&text, std::path::Path::new("t.toml"), |_| None)
            .unwrap();
    assert!(config.source.is_some());
    let app = engage_sync::sync::App::connect(config).await.unwrap();
    let report = sync(&app).await;
    assert!(report.is_success(), "{:?}", report.failure_reason());
    let outcome = &report.definitions[0];
    assert_eq!(
        (
            outcome.source_rows,
            outcome.skipped_rows,
            outcome.duplicate_rows,
            outcome.added
        ),
        (5, 1, 1, 3)
    );
    assert_eq!(
        env.snapshot("streamed").await,
        vec![
            "back\\slash".to_owned(),
            "plain".to_owned(),
            "tab\tid".to_owned()
        ]
    );
    assert_eq!(
        env.emulator.profile("tab\tid").unwrap().attributes["streamed"],
        json!(true)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_prints_changes_and_stores_and_sends_nothing() {
    let env = TestEnv::new().await;
    env.set_members("m", &ids("u", 0..30)).await;
    let app = env.app(&audience("Members", "m")).await;
    let options = SyncOptions {
        dry_run: true,
        preview_limit: 5,
        ..SyncOptions::default()
    };
    let report = sync_once(&app, &options).await.unwrap();
    assert_eq!(report.definitions[0].added, 30);
    assert_eq!(report.preview.len(), 5);
    assert_eq!(
        report.preview[0],
        json!({"identifiers": {"custom_id": "u00000"}, "attributes": {"members": true}})
    );
    assert!(env.emulator.recorded().is_empty());
    assert_eq!(env.outbox_len().await, 0);
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM runs")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(runs, 0);

    // --only limits the pass to the named definitions, and names unknown keys.
    let options = SyncOptions {
        only: vec!["nope".into()],
        ..SyncOptions::default()
    };
    let error = sync_once(&app, &options).await.unwrap_err().to_string();
    assert!(
        error.contains("\"nope\"") && error.contains("members"),
        "{error}"
    );
}
