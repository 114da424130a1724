//! Self-tests of the harness: the topology, the faults and their ground truth, without observer.
//! They make sure the observer tests compare against real, non-zero kernel numbers.
use std::{net::SocketAddr, path::Path, time::Duration};

use anyhow::{Result, ensure};
use observer_tests::{Topology, faults, kernel_test, note};

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
    let _ = SocketAddr::new(topo.server_ip(true), 5003);
    Ok(())
}
