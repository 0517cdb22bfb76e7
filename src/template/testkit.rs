//! A minimal record and stage for exercising the template itself: the crash
//! tests run it in a child process (`examples/copy_stage.rs`) and the
//! benchmarks measure the template's overhead with it. Not part of the
//! pipeline.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Context, Stage, StageError};
use crate::records::{Meta, Record};

/// A small record: a video id, a sequence number and a body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    /// Identity.
    pub meta: Meta,
    /// Position of this record among its video's records.
    pub seq: i64,
    /// Payload.
    pub body: String,
}

impl Record for Item {
    const SCHEMA: &'static str = r#"{"type": "record", "name": "Item", "namespace": "vidpipe.test",
      "fields": [
        {"name": "meta", "type": {"type": "record", "name": "Meta", "namespace": "vidpipe", "fields": [
          {"name": "video_id", "type": "string"}, {"name": "generation", "type": "long"},
          {"name": "trace_id", "type": "string"}]}},
        {"name": "seq", "type": "long"},
        {"name": "body", "type": "string"}]}"#;
    fn meta(&self) -> &Meta {
        &self.meta
    }
}

/// Copies its input to its output after an optional delay: the stage with a
/// trivial body.
pub struct CopyStage {
    /// Simulated work per record.
    pub delay: Duration,
}

impl Stage for CopyStage {
    type Input = Item;
    type Output = Item;
    const NAME: &'static str = "copy";
    const INPUT: &'static str = "in";
    const OUTPUT: &'static str = "out";

    async fn process(&self, input: Item, _ctx: &Context) -> Result<Vec<Item>, StageError> {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        Ok(vec![input])
    }
}

/// Makes `dir/name`, an mp4 with a black video track and `text` spoken by
/// espeak-ng: test and benchmark media generated here, never downloaded.
pub fn spoken_video(dir: &Path, name: &str, text: &str) -> Result<PathBuf, String> {
    let wav = dir.join(format!("{name}.wav"));
    let status = Command::new("espeak-ng")
        .args(["-s", "150", "-w"])
        .arg(&wav)
        .arg(text)
        .status()
        .map_err(|e| format!("cannot run espeak-ng: {e}"))?;
    if !status.success() {
        return Err(format!("espeak-ng failed: {status}"));
    }
    let out = dir.join(name);
    let status = Command::new("ffmpeg")
        .args(["-loglevel", "error", "-nostdin", "-y", "-f", "lavfi", "-i"])
        .arg("color=c=black:s=160x120:r=10")
        .arg("-i")
        .arg(&wav)
        .args(["-shortest", "-c:v", "mpeg4", "-c:a", "aac"])
        .arg(&out)
        .status()
        .map_err(|e| format!("cannot run ffmpeg: {e}"))?;
    if !status.success() {
        return Err(format!("ffmpeg failed to make {name}: {status}"));
    }
    Ok(out)
}
