//! 3, 4. Userspace decode + aggregation throughput on one core, and the memory it holds for
//! 100,000 flows (`observer/examples/pipeline_bench.rs`: one run per stage measures both).
use std::{process::Command, time::Duration};

use anyhow::{Result, ensure};
use serde_json::Value;

use super::{
    Bins, PIPELINE_EVENTS, PIPELINE_FLOWS, STORM_NICE,
    harness::{last_json, run_bounded},
    say,
};

#[derive(Debug, Default)]
pub struct Pipeline {
    pub runs: Vec<Value>,
}

pub fn measure_pipeline(bins: &Bins) -> Result<Pipeline> {
    let mut pipeline = Pipeline::default();
    for mode in ["decode", "count", "engine"] {
        let (status, stdout, stderr) = run_bounded(
            Command::new(&bins.pipeline).args([
                "--nice",
                STORM_NICE,
                "--mode",
                mode,
                "--events",
                &PIPELINE_EVENTS.to_string(),
                "--flows",
                &PIPELINE_FLOWS.to_string(),
            ]),
            Duration::from_secs(120),
        )?;
        ensure!(
            status.success(),
            "pipeline_bench --mode {mode} failed ({status}): {}",
            stderr.trim()
        );
        let v = last_json(&stdout)?;
        say(&format!(
            "pipeline {mode}: {:.2} M events/s, VmRSS {:.1} MiB",
            v["events_per_sec"].as_f64().unwrap_or(0.0) / 1e6,
            v["rss_kib"].as_f64().unwrap_or(0.0) / 1024.0
        ));
        pipeline.runs.push(v);
    }
    Ok(pipeline)
}
