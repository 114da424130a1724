//! Self-tests of the harness: the topology, the faults and their ground truth, without observer.
//! They make sure the observer tests compare against real, non-zero kernel numbers.
use std::{path::Path, time::Duration};

use anyhow::{Result, ensure};
use observer_tests::{Filter, Observer, Topology, faults, flow_count_problems, kernel_test, note};

// Subnets 10.200.100+ are the harness's; retransmits.rs uses lower ones.

#[test]
fn topology_is_isolated_and_cleaned_up() -> Result<()> {
    let Some(t) = kernel_test("topology_is_isolated_and_cleaned_up") else {
        return Ok(());
    };
    let names;
    {
        let topo = Topology::new(&t.name, 100)?;
        names = [topo.client.name.clone(), topo.server.name.clone()];
        ensure!(
            topo.client.inode()? != topo.server.inode()?,
            "same namespace inode"
        );
        // Traffic both ways works over IPv4 and IPv6, no loss: no retransmits.
        for v6 in [false, true] {
            let out = faults::bulk_transfer(&topo, v6, 5100, 256 * 1024)?;
            ensure!(
                out.syn_retrans == 0,
                "SYN retransmits without a fault: {out:?}"
            );
        }
        // Nothing routes out.
        let routes = topo.client.ip(&["route", "get", "192.0.2.1"]);
        ensure!(routes.is_err(), "client can route to 192.0.2.1: {routes:?}");
        let c = topo.client.counters()?;
        for k in [
            "TcpRetransSegs",
            "TcpExtTCPSynRetrans",
            "TcpExtListenOverflows",
            "Ip6InReceives",
        ] {
            c.get(k)?;
        }
    }
    for n in names {
        ensure!(
            !Path::new(&format!("/run/netns/{n}")).exists(),
            "{n} left behind"
        );
    }
    Ok(())
}

#[test]
fn data_loss_makes_client_retransmit() -> Result<()> {
    let Some(t) = kernel_test("data_loss_makes_client_retransmit") else {
        return Ok(());
    };
    for (v6, subnet) in [(false, 101), (true, 102)] {
        let topo = Topology::new(&t.name, subnet)?;
        faults::drop_data_to(&topo.server, v6, 5001, 8)?;
        let out = faults::bulk_transfer(&topo, v6, 5001, 4 << 20)?;
        let dropped = topo.server.iptables_packets(v6, "INPUT")?;
        note(&format!(
            "v6={v6}: dropped {dropped} skbs, TcpRetransSegs delta {}, tcpi_total_retrans {}, changes {:?}",
            out.retrans_segs, out.bulk.total_retrans, out.changes
        ));
        ensure!(dropped > 0, "the rule dropped nothing");
        ensure!(out.retrans_segs > 0, "no retransmits: {out:?}");
        ensure!(out.syn_retrans == 0, "SYN retransmits: {out:?}");
        ensure!(
            u64::from(out.bulk.total_retrans) == out.retrans_segs,
            "tcpi_total_retrans {} != TcpRetransSegs delta {}",
            out.bulk.total_retrans,
            out.retrans_segs
        );
    }
    Ok(())
}

#[test]
fn syn_loss_makes_client_retransmit_syns() -> Result<()> {
    let Some(t) = kernel_test("syn_loss_makes_client_retransmit_syns") else {
        return Ok(());
    };
    let topo = Topology::new(&t.name, 103)?;
    faults::drop_syns_to(&topo.server, false, 5002, 2)?;
    let out = faults::parallel_connects(&topo, false, 5002, 6, Duration::from_secs(10))?;
    let dropped = topo.server.iptables_packets(false, "INPUT")?;
    note(&format!(
        "dropped {dropped} SYNs, TCPSynRetrans delta {}, {out:?}",
        out.syn_retrans
    ));
    ensure!(out.syn_retrans > 0, "no SYN retransmits");
    ensure!(
        out.syn_retrans == dropped,
        "SYN retransmits {} != SYNs dropped {dropped}",
        out.syn_retrans
    );
    Ok(())
}

#[test]
fn missing_ack_makes_server_retransmit_synacks() -> Result<()> {
    let Some(t) = kernel_test("missing_ack_makes_server_retransmit_synacks") else {
        return Ok(());
    };
    let topo = Topology::new(&t.name, 104)?;
    faults::drop_handshake_acks(&topo.client, true, 5003)?;
    let out = faults::half_open_handshakes(&topo, true, 5003, 3, 2)?;
    note(&format!("{out:?}"));
    ensure!(
        out.synack_retrans == out.expected && out.expected == 6,
        "{out:?}"
    );
    Ok(())
}

/// A stand-in for observer that follows the output contract; `mode` breaks it on purpose.
const FAKE_OBSERVER: &str = r#"#!/usr/bin/env python3
import json, signal, sys, time
mode = sys.argv[sys.argv.index("--mode") + 1]
def rec(**kw):
    print(json.dumps(kw), flush=True)
t = "2026-11-22T03:40:00.123456789Z"
stopped = []
signal.signal(signal.SIGINT, lambda *_: stopped.append(1))  # before `start`, as observer must
rec(type="start", schema_version=1, observer_version="0.1.0", time=t, host="h", kernel="6.18",
    programs=[{"name": "a", "tracepoint": "tcp:tcp_retransmit_skb", "attached": True},
              {"name": "b", "tracepoint": "tcp:tcp_retransmit_synack", "attached": True}],
    sysctls={}, export_per_flow=0)
if mode == "bad":
    print("hello from stdout", flush=True)
deadline = time.monotonic() + 20
while not stopped and time.monotonic() < deadline:
    time.sleep(0.01)
ev = dict(type="retransmit", time=t, family="ipv4", saddr="10.200.1.1", sport=4000,
          daddr="10.200.1.2", dport=5001, state="ESTABLISHED", segs=2, flow_count=2,
          netns=4026532000, err=0, pid=0)
rec(**ev)
tot = {"events": 1, "counted": 2, "exported": 1, "suppressed": 0, "received": 1}
zero = {"events": 0, "counted": 0, "exported": 0, "suppressed": 0, "received": 0}
flow = {k: ev[k] for k in ["family", "saddr", "sport", "daddr", "dport", "netns"]}
flow.update(retransmit_segs=2, retransmit_skbs=1, retransmit_failed=0, syn_retransmits=0,
            synack_retransmits=0, suppressed=0)
rec(type="stop", time=t, reason="signal",
    totals={"retransmit": tot, "syn_retransmit": zero, "synack_retransmit": zero},
    lost=0, missed_runs=0, flows=[flow])
sys.exit(3 if mode == "exit3" else 0)
"#;

struct TempFile(std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn observer_runner_checks_the_output_contract() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::temp_dir().join(format!("obs-fake-observer-{}.py", std::process::id()));
    std::fs::write(&path, FAKE_OBSERVER)?;
    let file = TempFile(path);
    std::fs::set_permissions(&file.0, std::fs::Permissions::from_mode(0o755))?;

    let mut good = Observer::start_bin(&file.0, &["--mode", "good"])?;
    let run = good.stop()?;
    let problems = run.schema_problems(Some(0));
    ensure!(problems.is_empty(), "{problems:?}");
    let flow = Filter {
        saddr: Some("10.200.1.1".parse()?),
        sport: Some(4000),
        ..Filter::default()
    };
    ensure!(run.events("retransmit", &flow).len() == 1);
    ensure!(run.flows(&flow)?.len() == 1);
    ensure!(flow_count_problems(&run.events("retransmit", &flow)).is_empty());
    ensure!(
        run.events(
            "retransmit",
            &Filter {
                sport: Some(4001),
                ..flow
            }
        )
        .is_empty()
    );

    let mut bad = Observer::start_bin(&file.0, &["--mode", "bad"])?;
    let err = bad
        .stop()
        .expect_err("a non-JSON stdout line must fail the run");
    ensure!(format!("{err:#}").contains("hello from stdout"), "{err:#}");

    let mut exit3 = Observer::start_bin(&file.0, &["--mode", "exit3"])?;
    let err = exit3.stop().expect_err("exit code 3 must fail the run");
    ensure!(format!("{err:#}").contains("exit"), "{err:#}");
    Ok(())
}
