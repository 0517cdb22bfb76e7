//! `vidpipe bridge`: the Kafka side of the RabbitMQ adapter (being written).

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// Settings of the bridge (`[bridge]` in vidpipe.toml).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BridgeConfig {}

/// Why the bridge stopped.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// Not built yet.
    #[error("the bridge is not built yet")]
    NotBuilt,
}

/// Runs the bridge until `shutdown`.
pub async fn run(_config: Config, _shutdown: CancellationToken) -> Result<(), BridgeError> {
    Err(BridgeError::NotBuilt)
}
