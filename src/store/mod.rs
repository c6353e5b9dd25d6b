//! The state every process shares: jobs, their input rows, batches, the
//! decode cache, recall lookups and the shared limiter.
//!
//! One core ([`core`]) holds every operation, written once; two thin
//! dialects supply what differs: [`postgres`] (production, many machines;
//! each install in a schema of its own, so one database can host several
//! and every test takes its own) and [`sqlite`] (one machine, one file, no
//! service). Both pass one conformance suite (tests/conformance.rs). The
//! store owns its SQL and nothing else: no HTTP, no queue (the application
//! sets the queue up beside it), no output format.

mod bucket;
mod core;
pub mod postgres;
mod privacy;
mod records;
mod schedules;
mod sql;
pub mod sqlite;

pub use core::{PlanLock, Store};
pub use privacy::FORGOTTEN;
pub use records::*;

impl Store {
    /// Opens the state store `url` names (creating a SQLite file, or a
    /// Postgres schema, if needed) and migrates it. On SQLite the returned
    /// guard keeps other processes from opening the file until it is dropped:
    /// hold it while the queue's tables are set up beside it.
    pub async fn open(
        url: &DatabaseUrl,
        schema: &str,
        connections: u32,
    ) -> Result<(Store, Option<std::fs::File>), StoreError> {
        let (db, lock) = match url {
            DatabaseUrl::Postgres(u) => (core::Db::Pg(postgres::open(u, schema, connections).await?), None),
            DatabaseUrl::Sqlite(u) => {
                let (pool, queue, lock) = sqlite::open(u, connections).await?;
                (core::Db::Lite { pool, queue, writer: Default::default() }, Some(lock))
            }
        };
        Ok((Store::with_install(db).await?, lock))
    }

    /// Whether `url` holds vinetl state already (a SQLite file, or a
    /// Postgres schema with vinetl's tables), without creating any.
    pub async fn exists(url: &DatabaseUrl, schema: &str) -> Result<bool, StoreError> {
        match url {
            DatabaseUrl::Sqlite(u) => Ok(std::path::Path::new(sqlite::path_of(u)).is_file()),
            DatabaseUrl::Postgres(u) => postgres::has_state(u, schema).await,
        }
    }
}
