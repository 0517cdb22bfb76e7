//! PostgreSQL connection and migrations.
//!
//! The migrations in `migrations/` are compiled into the binary, so
//! `vidpipe migrate` and every process that needs the schema apply the same
//! set; sqlx records what ran in `_sqlx_migrations` and refuses a database
//! whose applied migrations were edited afterwards.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

/// The migrations of this build.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A database problem, without the connection URL (it holds a password).
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The server could not be reached or refused the login.
    #[error("cannot connect to PostgreSQL at {target}: {source}")]
    Connect {
        /// Host, port and database, never the password.
        target: String,
        /// The driver's error.
        source: sqlx::Error,
    },
    /// A migration failed.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// Host, port and database of a URL, for messages (no user, no password).
pub fn describe(url: &SecretString) -> String {
    match url::Url::parse(url.expose_secret()) {
        Ok(u) => format!(
            "{}:{}{}",
            u.host_str().unwrap_or("?"),
            u.port().unwrap_or(5432),
            u.path()
        ),
        Err(_) => "<unparseable database_url>".into(),
    }
}

/// Opens a pool, failing fast (5 s) when the server is not there.
pub async fn connect(url: &SecretString, max_connections: u32) -> Result<PgPool, DbError> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect(url.expose_secret())
        .await
        .map_err(|source| DbError::Connect {
            target: describe(url),
            source,
        })
}

/// Applies every pending migration.
pub async fn migrate(pool: &PgPool) -> Result<(), DbError> {
    MIGRATOR.run(pool).await?;
    Ok(())
}
