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

impl DbError {
    /// Whether the settings are wrong rather than the server away: the
    /// login was refused (SQLSTATE 28000, 28P01) or the database does not
    /// exist (3D000). Trying again will not help; fixing `database_url`
    /// will.
    pub fn is_configuration(&self) -> bool {
        match self {
            DbError::Connect {
                source: sqlx::Error::Database(d),
                ..
            } => matches!(d.code().as_deref(), Some("28000" | "28P01" | "3D000")),
            _ => false,
        }
    }
}

/// Whether PostgreSQL did not answer or will not serve us now (try again
/// later; an operator's matter, not a fault in a request or a query): no
/// connection, or a connection exception (SQLSTATE class 08), bad
/// credentials (28), no connections or resources left (53), shutting down
/// (57).
pub fn is_unavailable(e: &sqlx::Error) -> bool {
    use sqlx::Error as E;
    match e {
        E::PoolTimedOut | E::PoolClosed | E::Io(_) | E::Tls(_) | E::Protocol(_) => true,
        E::Database(d) => d.code().is_some_and(|c| {
            ["08", "28", "53", "57"]
                .iter()
                .any(|class| c.starts_with(class))
        }),
        _ => false,
    }
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
