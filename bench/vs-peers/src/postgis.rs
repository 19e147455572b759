//! PostGIS's side: the drivers in `drivers(id text primary key, geom geometry(Point, 32618))`
//! with a GiST index, nearest 10 within 5 km by index KNN (the statement of `knn.sql`,
//! which pgbench runs too), and position updates, one `UPDATE` per statement. Every
//! statement is prepared once per connection; every call is bounded by `CALL_WAIT`.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use tokio_postgres::{Client, NoTls, Statement};

/// How long any single call to Postgres may take before it counts as a failure.
pub const CALL_WAIT: Duration = Duration::from_secs(30);

/// The metric projection the positions are kept in: UTM zone 18N, whose zone holds the
/// box around Montreal (see README.md for why not `geography`).
pub const SRID: i32 = 32618;

/// `knn.sql`'s statement with `$1`, `$2` for pgbench's `:lat`, `:lng`.
pub fn knn_sql() -> String {
    let sql = include_str!("../knn.sql")
        .lines()
        .find(|l| l.starts_with("SELECT "))
        .expect("knn.sql has a SELECT line");
    sql.trim_end_matches(';')
        .replace(":lat", "$1")
        .replace(":lng", "$2")
}

/// The same query, returning each driver's position too (for the sanity check).
fn knn_with_coord_sql() -> String {
    knn_sql().replacen(
        "SELECT id FROM",
        "SELECT id, ST_Y(ST_Transform(geom, 4326)), ST_X(ST_Transform(geom, 4326)) FROM",
        1,
    )
}

fn point(lat: &str, lng: &str) -> String {
    format!("ST_Transform(ST_SetSRID(ST_MakePoint({lng}, {lat}), 4326), {SRID})")
}

async fn bounded<T>(
    what: &str,
    f: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T> {
    tokio::time::timeout(CALL_WAIT, f)
        .await
        .map_err(|_| anyhow!("{what}: no answer within {CALL_WAIT:?}"))?
        .with_context(|| what.to_owned())
}

pub async fn connect(conn: &str) -> Result<Client> {
    let (client, connection) = bounded(
        "connecting to Postgres",
        tokio_postgres::connect(conn, NoTls),
    )
    .await?;
    tokio::spawn(async move {
        // Ends when the client is dropped; an error shows up on the client's next call.
        let _ = connection.await;
    });
    Ok(client)
}

/// One client connection with the bench's statements prepared.
pub struct Conn {
    client: Client,
    knn: Statement,
    knn_coord: Statement,
    update: Statement,
}

impl Conn {
    pub async fn open(conn: &str) -> Result<Conn> {
        let client = connect(conn).await?;
        let knn = bounded("preparing the KNN query", client.prepare(&knn_sql())).await?;
        let knn_coord = bounded(
            "preparing the KNN query with positions",
            client.prepare(&knn_with_coord_sql()),
        )
        .await?;
        let update_sql = format!(
            "UPDATE drivers SET geom = {} WHERE id = $3",
            point("$1", "$2")
        );
        let update = bounded("preparing the UPDATE", client.prepare(&update_sql)).await?;
        Ok(Conn {
            client,
            knn,
            knn_coord,
            update,
        })
    }

    /// Nearest 10 within 5 km: how many came back.
    pub async fn nearest(&self, (lat, lng): (f64, f64)) -> Result<usize> {
        let rows = bounded("KNN query", self.client.query(&self.knn, &[&lat, &lng])).await?;
        Ok(rows.len())
    }

    /// Nearest 10 within 5 km with their positions (lat, lng), nearest first.
    pub async fn nearest_with_coord(&self, (lat, lng): (f64, f64)) -> Result<Vec<(f64, f64)>> {
        let rows = bounded(
            "KNN query with positions",
            self.client.query(&self.knn_coord, &[&lat, &lng]),
        )
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get::<_, f64>(1)?, r.try_get::<_, f64>(2)?)))
            .collect()
    }

    /// Moves driver `id` to (`lat`, `lng`): one UPDATE, committed on its own.
    pub async fn update(&self, id: &str, (lat, lng): (f64, f64)) -> Result<()> {
        let n = bounded(
            "UPDATE",
            self.client.execute(&self.update, &[&lat, &lng, &id]),
        )
        .await?;
        if n != 1 {
            bail!("UPDATE of {id} changed {n} rows");
        }
        Ok(())
    }
}

/// (Re)creates the table with `positions` (driver `i` is `d<i>`, as in Redis), builds the
/// GiST index, and analyses it. Returns the server's versions and the seconds it took.
pub async fn load(conn: &str, positions: &[(f64, f64)]) -> Result<(String, f64)> {
    let c = connect(conn).await?;
    let version: String = bounded(
        "reading versions",
        c.query_one(
            "SELECT split_part(version(), ' ', 2) || ' with PostGIS ' || postgis_lib_version()",
            &[],
        ),
    )
    .await?
    .try_get(0)?;
    let start = std::time::Instant::now();
    bounded(
        "creating the table",
        c.batch_execute(&format!(
            "DROP TABLE IF EXISTS drivers;
             CREATE TABLE drivers (id text PRIMARY KEY, geom geometry(Point, {SRID}) NOT NULL);"
        )),
    )
    .await?;
    let insert = format!(
        "INSERT INTO drivers (id, geom) SELECT id, {} FROM unnest($1::text[], $2::float8[], $3::float8[]) AS u(id, lat, lng)",
        point("lat", "lng")
    );
    let insert = bounded("preparing the INSERT", c.prepare(&insert)).await?;
    for (k, chunk) in positions.chunks(1000).enumerate() {
        let ids: Vec<String> = (0..chunk.len())
            .map(|j| format!("d{}", k * 1000 + j))
            .collect();
        let lats: Vec<f64> = chunk.iter().map(|p| p.0).collect();
        let lngs: Vec<f64> = chunk.iter().map(|p| p.1).collect();
        bounded("INSERT", c.execute(&insert, &[&ids, &lats, &lngs])).await?;
    }
    bounded(
        "indexing",
        c.batch_execute("CREATE INDEX drivers_geom ON drivers USING gist (geom)"),
    )
    .await?;
    // On its own: VACUUM cannot run in the implicit transaction of a multi-statement batch.
    bounded("VACUUM ANALYZE", c.batch_execute("VACUUM ANALYZE drivers")).await?;
    let secs = start.elapsed().as_secs_f64();
    let n: i64 = bounded("counting", c.query_one("SELECT count(*) FROM drivers", &[]))
        .await?
        .try_get(0)?;
    if n as usize != positions.len() {
        bail!("Postgres holds {n} drivers, not {}", positions.len());
    }
    Ok((version, secs))
}

/// The plan Postgres runs for the prepared KNN query once it has settled on a generic
/// plan (after five executions), as `EXPLAIN` prints it: it must be an index scan ordered
/// by `<->`, or the comparison is not with index KNN.
pub async fn knn_plan(conn: &str, at: (f64, f64)) -> Result<String> {
    let c = connect(conn).await?;
    bounded(
        "forcing a generic plan",
        c.batch_execute("SET plan_cache_mode = force_generic_plan"),
    )
    .await?;
    let sql = format!("PREPARE knn(float8, float8) AS {}", knn_sql());
    bounded("PREPARE", c.batch_execute(&sql)).await?;
    let rows = bounded(
        "EXPLAIN",
        c.query(&format!("EXPLAIN EXECUTE knn({}, {})", at.0, at.1), &[]),
    )
    .await?;
    let plan: Vec<String> = rows
        .iter()
        .map(|r| r.try_get::<_, String>(0))
        .collect::<Result<_, _>>()?;
    Ok(plan.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prepared_statement_is_knn_sql_with_parameters() {
        let sql = knn_sql();
        assert!(sql.starts_with("SELECT id FROM drivers WHERE ST_DWithin(geom, "));
        assert!(sql.contains("ORDER BY geom <-> "));
        assert!(sql.ends_with("LIMIT 10"));
        assert!(!sql.contains(':'), "{sql}");
        assert_eq!(sql.matches("ST_MakePoint($2, $1)").count(), 2, "{sql}");
        assert!(knn_with_coord_sql().starts_with("SELECT id, ST_Y("));
    }
}
