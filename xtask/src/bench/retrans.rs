//! 1b. The retransmit storm: two namespaces joined by veth, a share of the server's inbound
//! data segments dropped by iptables; observer's kernel cost per event.
use std::{process::Stdio, time::Duration};

use anyhow::{Context, Result, anyhow};

use super::{
    BenchArgs, Bins, RETRANS_CONNS, RETRANS_DROP_PROBABILITY, RETRANS_PORT, STORM_NICE,
    harness::{
        BpfStats, Netns, Proc, check_interrupted, netns_name, ns_per_event, read_lines,
        run_checked, total,
    },
    refused::{ModeRuns, export_label, storm_window},
    say,
    stats::{int, ns_opt},
    tools::{Export, Observer, RETRANS_FLOORS, ToolOutcome, ToolResult, with_subject},
};

#[derive(Debug, Default)]
pub struct Retrans {
    pub default: ModeRuns,
    pub one_by_one: ModeRuns,
    /// What trivial programs on the same tracepoints cost on this storm (bpftrace).
    pub floors: Vec<ToolResult>,
}

pub fn measure_retrans(bins: &Bins, args: &BenchArgs, stats: &BpfStats) -> Result<Retrans> {
    let client = Netns::create(&netns_name("c"))?;
    let server = Netns::create(&netns_name("s"))?;
    client.ip(&[
        "link",
        "add",
        "veth0",
        "type",
        "veth",
        "peer",
        "name",
        "veth1",
        "netns",
        &server.name,
    ])?;
    client.ip(&["addr", "add", "10.201.0.1/24", "dev", "veth0"])?;
    server.ip(&["addr", "add", "10.201.0.2/24", "dev", "veth1"])?;
    // One segment per skb: every retransmit and every drop is one event (with GSO, one lost
    // 64 KiB skb stands for dozens of segments and the storm has few events).
    client.ip(&["link", "set", "veth0", "gso_max_segs", "1", "up"])?;
    server.ip(&["link", "set", "veth1", "gso_max_segs", "1", "up"])?;
    // Drop a share of the data segments (not the handshake) arriving at the server.
    run_checked(server.command("iptables").args([
        "-w",
        "5",
        "-A",
        "INPUT",
        "-p",
        "tcp",
        "--dport",
        &RETRANS_PORT.to_string(),
        "-m",
        "length",
        "--length",
        "200:65535",
        "-m",
        "statistic",
        "--mode",
        "random",
        "--probability",
        RETRANS_DROP_PROBABILITY,
        "-j",
        "DROP",
    ]))?;
    let addr = format!("10.201.0.2:{RETRANS_PORT}");
    // The sink's lifetime bounds itself: all windows plus slack.
    let sink_secs = (f64::from(args.runs) * 2.0 * (args.storm_secs + 5.0) + 60.0).to_string();
    let mut child = server
        .command(&bins.storm)
        .args(["sink", "--listen", &addr, "--duration", &sink_secs])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the sink")?;
    let sink_out = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let _sink = Proc::new(child, libc::SIGKILL);
    let ready = read_lines(sink_out);
    ready
        .first
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| anyhow!("the sink in {} did not start listening", server.name))?;

    let storm: Vec<String> = [
        "--nice",
        STORM_NICE,
        "bulk",
        "--addr",
        &addr,
        "--conns",
        &RETRANS_CONNS.to_string(),
        "--duration",
        &args.storm_secs.to_string(),
    ]
    .map(str::to_owned)
    .to_vec();
    let mut retrans = Retrans::default();
    if !args.no_tools {
        for &tool in RETRANS_FLOORS {
            check_interrupted()?;
            let measured = with_subject(tool, &bins.observer, |watched, _| {
                storm_window(&client, bins, &storm, watched, stats, true, args.storm_secs)
            })?;
            let outcome = match measured {
                Err(why) => ToolOutcome::NotStarted(why),
                Ok((programs, cost)) => {
                    let all = total(&cost.progs);
                    say(&format!(
                        "retransmit storm, {}: {} ns/event over {} events",
                        tool.label(),
                        ns_opt(ns_per_event(all)),
                        int(all.run_cnt as f64)
                    ));
                    ToolOutcome::Measured {
                        programs,
                        cost: Box::new(cost),
                        none: Box::default(),
                        rate: Box::default(),
                    }
                }
            };
            retrans.floors.push(ToolResult {
                label: tool.label(),
                outcome,
            });
        }
    }
    for round in 0..args.runs {
        for export in [Export::Default, Export::OneByOne] {
            let observer = Observer::start(bins, export, &format!("retrans-{export:?}-{round}"))?;
            let watched = Some((observer.pid(), &observer.names));
            let cost = storm_window(&client, bins, &storm, watched, stats, true, args.storm_secs)?;
            let all = total(&cost.progs);
            say(&format!(
                "retransmit storm, run {}: observer {}: {} ns/event over {} events ({} segments retransmitted, {:.0} Mbit/s)",
                round + 1,
                export_label(export),
                ns_opt(ns_per_event(all)),
                int(all.run_cnt as f64),
                int(cost.storm["total_retrans"].as_f64().unwrap_or(0.0)),
                cost.storm["mbit_per_sec"].as_f64().unwrap_or(0.0)
            ));
            let stop = observer.stop();
            let runs = match export {
                Export::Default => &mut retrans.default,
                Export::OneByOne => &mut retrans.one_by_one,
            };
            runs.cost.push(cost);
            runs.stops.push(stop);
        }
    }
    Ok(retrans)
}
