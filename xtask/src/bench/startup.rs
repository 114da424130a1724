//! Start-up (section 5): spawn to `start` record.
use std::time::Duration;

use anyhow::Result;

use super::{
    Bins, STARTUP_RUNS,
    harness::sleep,
    say,
    stats::{f3, list, median},
    tools::{Export, Observer},
};

#[derive(Debug, Default)]
pub struct Startup {
    pub secs: Vec<f64>,
    pub attached: usize,
    pub programs: usize,
}

pub fn measure_startup(bins: &Bins) -> Result<Startup> {
    let mut startup = Startup::default();
    for i in 0..STARTUP_RUNS {
        let observer = Observer::start(bins, Export::Default, &format!("startup-{i}"))?;
        startup.secs.push(observer.startup.as_secs_f64());
        (startup.attached, startup.programs) = observer.attached();
        let _ = observer.stop();
        sleep(Duration::from_millis(200))?;
    }
    say(&format!(
        "start-up: {} s (runs: {})",
        f3(median(&startup.secs)),
        list(&startup.secs, f3)
    ));
    Ok(startup)
}
