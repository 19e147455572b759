//! Faults of the PostgreSQL store under the real `dispatchd` and a real PostgreSQL (the
//! server `DISPATCH_TEST_DATABASE_URL` names; without it these tests skip saying so, or
//! fail when `CI` is set).
//!
//! The database is taken away and given back without stopping the shared server:
//! `ALTER DATABASE … ALLOW_CONNECTIONS false` and `pg_terminate_backend` of its sessions
//! is what a lost server looks like to the client (connections dropped, new ones
//! refused), for this test's database alone, so tests run in parallel.
//!
//! - down at start: `/readyz` answers 503 saying why, start-up retries with backoff, and
//!   becomes ready once the database is back;
//! - lost while running: writes answer `unavailable` and change nothing, what is in
//!   memory is still served, writes resume by themselves when it is back, and after a
//!   `kill -9` everything acknowledged is there;
//! - the password of `--database-url` never appears in the log, `/readyz`, `/metrics`
//!   or `/admin/`.

use dispatch_tests::{
    Dispatchd, DispatchdBuilder, assert_nothing_acknowledged_lost, eventually, ride_to,
};
use dispatch_transport::wire::TripState;
use serde_json::{Value, json};

const ADMIN: &str = "adm-postgres-0123456789abcdef0123";

/// One test's database, reached by a role of its own whose password is distinctive.
struct Db {
    name: String,
    url: String,
    password: String,
}

/// Runs `sql` as the test server's administrator, on its `postgres` database.
fn admin_sql(sql: &str) {
    let url = std::env::var("DISPATCH_TEST_DATABASE_URL").expect("checked by test_database");
    let sql = sql.to_owned();
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .expect("connect as the test administrator");
                tokio::spawn(conn);
                c.batch_execute(&sql).await.expect("administrative SQL");
            })
    })
    .join()
    .unwrap();
}

impl Db {
    fn new(test: &str) -> Option<Db> {
        let url = dispatch_persistence::pg::test_database(test)?;
        let name = url
            .rsplit('/')
            .next()
            .and_then(|t| t.split('?').next())
            .expect("a URL ending in the database name")
            .to_owned();
        let password = format!("pw-{}-Zq7", std::process::id());
        let role = format!("{name}_owner");
        admin_sql(&format!(
            "CREATE ROLE {role} LOGIN PASSWORD '{password}'; ALTER DATABASE {name} OWNER TO {role};"
        ));
        // The same server and database, as that role.
        let (scheme, rest) = url.split_once("://").expect("a postgres:// URL");
        let host = rest.split_once('@').map(|(_, h)| h).unwrap_or(rest);
        Some(Db {
            url: format!("{scheme}://{role}:{password}@{host}"),
            name,
            password,
        })
    }

    /// Drops every session of the database and refuses new ones.
    fn cut(&self) {
        admin_sql(&format!(
            "ALTER DATABASE {n} ALLOW_CONNECTIONS false;
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE datname = '{n}' AND pid <> pg_backend_pid();",
            n = self.name
        ));
    }

    fn restore(&self) {
        admin_sql(&format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS true",
            self.name
        ));
    }

    fn builder(&self, name: &str) -> DispatchdBuilder {
        Dispatchd::builder(name)
            .env("DISPATCH_STORE", "postgres")
            .env("DISPATCH_DATABASE_URL", &self.url)
            .flags(&[
                "--admin-token",
                ADMIN,
                "--database-timeout-ms",
                "2000",
                "--offer-timeout-ms",
                "120000",
                "--snapshot-interval-ms",
                "100",
            ])
    }
}

fn rider_body(i: usize) -> Value {
    json!({"name": format!("R{i}"), "phone": "+15550100"})
}

/// What the server shows of itself, to look for the password in.
async fn everything_shown(s: &Dispatchd) -> String {
    let mut all = s.log_text();
    for path in ["/readyz", "/metrics", "/admin/stats", "/admin/trips"] {
        if let Ok(r) = s.http.get(s.url(path)).bearer_auth(ADMIN).send().await {
            all.push_str(&r.text().await.unwrap_or_default());
        }
    }
    all
}

#[tokio::test]
async fn postgres_down_at_start_readyz_says_why_then_recovers() {
    let Some(db) = Db::new("postgres_down_at_start_readyz_says_why_then_recovers") else {
        return;
    };
    db.cut();
    let s = db.builder("pg-down-at-start").spawn();
    let why = eventually("/readyz 503 naming the store's problem", || {
        let s = &s;
        async move {
            let r = s.http.get(s.url("/readyz")).send().await.ok()?;
            let status = r.status().as_u16();
            let body = r.text().await.ok()?;
            (status == 503 && body.contains("not currently accepting connections")).then_some(body)
        }
    })
    .await;
    assert!(why.contains("store is unavailable"), "{why}");
    assert!(!why.contains(&db.password), "the password leaked: {why}");
    // Before recovery the registry is not loaded: a token is neither known nor unknown,
    // so it gets 503 `unavailable` (retry), never 401 (which tells an app to drop it).
    for path in ["/v1/trips/trp_0", "/v1/drivers/nearby?lat=45.5&lng=-73.6"] {
        let (st, v) = s.get(path, Some("tok_not_loaded_yet")).await;
        assert_eq!(
            (st, &v["error"]["code"]),
            (503, &json!("unavailable")),
            "{path}: {v}"
        );
    }
    assert!(
        s.log_text()
            .contains("PostgreSQL not reachable yet; retrying"),
        "{}",
        s.log_text()
    );
    db.restore();
    s.wait_ready().await;
    let (st, v) = s.post("/v1/riders", None, rider_body(1)).await;
    assert_eq!(st, 201, "{v}");
    let shown = everything_shown(&s).await;
    assert!(
        !shown.contains(&db.password),
        "the password leaked: {shown}"
    );
}

#[tokio::test]
async fn postgres_lost_while_running_refuses_writes_then_resumes_losing_nothing() {
    let Some(db) =
        Db::new("postgres_lost_while_running_refuses_writes_then_resumes_losing_nothing")
    else {
        return;
    };
    let s = db.builder("pg-lost").start().await;
    let mut ride = ride_to(&s, TripState::Dispatching).await;
    let t = ride.trip.clone();
    let (st, v) = s.post("/v1/riders", None, rider_body(1)).await;
    assert_eq!(st, 201, "{v}");
    let mut acknowledged = vec![v["rider_id"].as_str().unwrap().to_owned()];

    db.cut();
    // Writes are refused, `unavailable`, and change nothing anyone sees.
    let (st, v) = s.post("/v1/riders", None, rider_body(2)).await;
    assert_eq!(
        (st, &v["error"]["code"]),
        (503, &json!("unavailable")),
        "{v}"
    );
    // A live trip is still read from memory; the accept is refused and changes nothing.
    ride.accept_is_refused_and_changes_nothing(&s).await;

    // Back: writes resume without a restart.
    db.restore();
    let late = eventually(
        "registrations succeed again once the database is back",
        || {
            let s = &s;
            async move {
                let (st, v) = s.post("/v1/riders", None, rider_body(3)).await;
                (st == 201).then(|| v["rider_id"].as_str().unwrap().to_owned())
            }
        },
    )
    .await;
    acknowledged.push(late);
    ride.advance(TripState::Completed).await;
    let shown = everything_shown(&s).await;
    assert!(!shown.contains(&db.password), "the password leaked");

    // kill -9, and start again on the same database: all of it is there.
    drop(ride);
    let s = s.crash_and_restart().await;
    assert_nothing_acknowledged_lost(&s, ADMIN, &t.trip_id, &acknowledged).await;
}
