//! `keel status`: nodes, groups, leaders, routing epoch and health, put
//! together from every node's own view.

use crate::cli::client::AdminClient;
use crate::cli::migrate::{pause, RECENT_COMPLETED};
use crate::core::codec::hex;
use crate::core::ids::{GroupId, NodeId};
use crate::node::rpc::GroupView;
use crate::node::service::{ClusterStatus, MigrationSummary};
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;

/// The report `keel status --json` prints (a stable scripting interface).
#[derive(Debug, Serialize)]
pub struct StatusReport {
    pub cluster_id: String,
    pub routing_epoch: u64,
    pub trusted_cas: Vec<String>,
    pub live_tokens: usize,
    pub migrations: Vec<MigrationSummary>,
    pub nodes: Vec<NodeReport>,
    pub groups: Vec<GroupReport>,
    pub healthy: bool,
    pub problems: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct NodeReport {
    pub id: u64,
    pub addr: String,
    pub state: String,
    pub reachable: bool,
    /// The CA that signed the node's certificate.
    pub cert_ca: Option<String>,
    pub leads: Vec<u64>,
}

#[derive(Debug, Serialize)]
pub struct GroupReport {
    pub group: u64,
    pub leader: Option<u64>,
    pub term: u64,
    pub commit: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    /// Nodes on which the group fail-stopped, and why.
    pub failed: Vec<String>,
}

/// Gathers the report.
pub async fn report(client: &AdminClient) -> Result<StatusReport, String> {
    let (first, each) = client.statuses().await?;
    Ok(assemble(&first, &each))
}

fn ids(nodes: &[NodeId]) -> Vec<u64> {
    nodes.iter().map(|n| n.get()).collect()
}

/// Puts the report together: each group as its leader sees it (or as any
/// node hosting it does, if none leads), and what is unhealthy.
pub fn assemble(
    first: &ClusterStatus,
    each: &[(NodeId, SocketAddr, Option<ClusterStatus>)],
) -> StatusReport {
    let mut problems = Vec::new();
    if first.local.retired {
        problems.push(format!(
            "node {} answered, but it was decommissioned: this view of the cluster may be stale",
            first.local.node.get()
        ));
    }
    let mut views: BTreeMap<GroupId, (GroupView, Vec<String>)> = BTreeMap::new();
    for (node, _, status) in each {
        let Some(status) = status else {
            problems.push(format!("node {} is unreachable", node.get()));
            continue;
        };
        for view in &status.local.groups {
            let entry = views
                .entry(view.group)
                .or_insert_with(|| (view.clone(), Vec::new()));
            if view.is_leader {
                entry.0 = view.clone();
            }
            if let Some(cause) = &view.failed {
                entry.1.push(format!("node {}: {cause}", node.get()));
            }
        }
    }
    let groups: Vec<GroupReport> = views
        .into_values()
        .map(|(view, failed)| {
            let leader = view.leader;
            if leader.is_none() {
                problems.push(format!("group {} has no leader", view.group.0));
            }
            for f in &failed {
                problems.push(format!("group {} fail-stopped on {f}", view.group.0));
            }
            GroupReport {
                group: view.group.0,
                leader: leader.map(NodeId::get),
                term: view.term,
                commit: view.commit,
                voters: ids(&view.voters),
                learners: ids(&view.learners),
                failed,
            }
        })
        .collect();
    let nodes = first
        .nodes
        .iter()
        .map(|summary| {
            let status = each
                .iter()
                .find(|(id, _, _)| *id == summary.node)
                .and_then(|(_, _, s)| s.as_ref());
            if !summary.active {
                problems.push(format!("node {} is {}", summary.node.get(), summary.state));
            }
            NodeReport {
                id: summary.node.get(),
                addr: summary.addr.clone(),
                state: summary.state.clone(),
                reachable: status.is_some(),
                cert_ca: status.map(|s| hex(&s.cert_ca)),
                leads: groups
                    .iter()
                    .filter(|g| g.leader == Some(summary.node.get()))
                    .map(|g| g.group)
                    .collect(),
            }
        })
        .collect();
    StatusReport {
        cluster_id: hex(&first.cluster_id),
        routing_epoch: first.routing_epoch,
        trusted_cas: first.trusted_cas.iter().map(|fp| hex(fp)).collect(),
        live_tokens: first.live_tokens,
        migrations: first.migrations.clone(),
        healthy: problems.is_empty(),
        problems,
        nodes,
        groups,
    }
}

fn list(ids: &[u64]) -> String {
    if ids.is_empty() {
        return "-".into();
    }
    ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
}

/// The human-readable form.
pub fn render(r: &StatusReport) -> String {
    let mut out = format!(
        "cluster {}  routing epoch {}  trusted CAs {}  live join tokens {}  migrations {}\n\n",
        r.cluster_id,
        r.routing_epoch,
        r.trusted_cas.len(),
        r.live_tokens,
        r.migrations.iter().filter(|m| !m.complete).count()
    );
    out.push_str(&format!(
        "{:<6}{:<24}{:<20}{:<11}{}\n",
        "NODE", "ADDRESS", "STATE", "REACHABLE", "LEADS GROUPS"
    ));
    for n in &r.nodes {
        out.push_str(&format!(
            "{:<6}{:<24}{:<20}{:<11}{}\n",
            n.id,
            n.addr,
            n.state,
            if n.reachable { "yes" } else { "NO" },
            list(&n.leads)
        ));
    }
    out.push_str(&format!(
        "\n{:<7}{:<8}{:<7}{:<9}{:<14}{}\n",
        "GROUP", "LEADER", "TERM", "COMMIT", "VOTERS", "LEARNERS"
    ));
    for g in &r.groups {
        out.push_str(&format!(
            "{:<7}{:<8}{:<7}{:<9}{:<14}{}\n",
            g.group,
            g.leader.map_or("-".into(), |l| l.to_string()),
            g.term,
            g.commit,
            list(&g.voters),
            list(&g.learners)
        ));
    }
    out.push_str(&render_migrations(&r.migrations));
    if r.healthy {
        out.push_str("\nhealth: ok\n");
    } else {
        out.push_str("\nhealth: DEGRADED\n");
        for p in &r.problems {
            out.push_str(&format!("  - {p}\n"));
        }
    }
    out
}

/// Unfinished migrations with their phase and attempt, then the last few
/// completed ones with their measured write pause.
fn render_migrations(rows: &[MigrationSummary]) -> String {
    let mut out = String::new();
    let mut open: Vec<&MigrationSummary> = rows.iter().filter(|m| !m.complete).collect();
    open.sort_by_key(|m| m.updated_ms);
    if !open.is_empty() {
        out.push_str(&format!(
            "\n{:<38}{:<15}{:<9}{}\n",
            "MIGRATION", "PHASE", "ATTEMPT", "WHAT"
        ));
        for m in open {
            out.push_str(&format!(
                "{:<38}{:<15}{:<9}{}\n",
                m.id, m.phase, m.attempt, m.what
            ));
        }
    }
    let mut done: Vec<&MigrationSummary> = rows.iter().filter(|m| m.complete).collect();
    if !done.is_empty() {
        done.sort_by_key(|m| std::cmp::Reverse(m.updated_ms));
        let shown = done.len().min(RECENT_COMPLETED);
        out.push_str(&format!(
            "\nCOMPLETED ({shown} most recent of {})\n{:<14}{}\n",
            done.len(),
            "WRITE PAUSE",
            "WHAT"
        ));
        for m in &done[..shown] {
            out.push_str(&format!("{:<14}{}\n", pause(m), m.what));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::routes::tests::{addr, status};

    fn row(
        id: &str,
        phase: &str,
        complete: bool,
        pause_us: Option<u64>,
        ms: u64,
    ) -> MigrationSummary {
        MigrationSummary {
            id: id.into(),
            planned: None,
            what: format!("move vShard {ms} from group 1 to group 2"),
            phase: phase.into(),
            attempt: 2,
            complete,
            write_pause_us: pause_us,
            updated_ms: ms,
        }
    }

    #[test]
    fn migrations_show_open_ones_and_the_latest_completed() {
        let mut rows = vec![row("open-1", "Tail", false, None, 1)];
        for ms in 10..20 {
            rows.push(row(
                &format!("done-{ms}"),
                "Complete",
                true,
                Some(ms * 1000 + 250),
                ms,
            ));
        }
        let text = render_migrations(&rows);
        assert!(text.contains("open-1"), "{text}");
        assert!(text.contains("Tail"), "{text}");
        assert!(text.contains("COMPLETED (5 most recent of 10)"), "{text}");
        assert!(text.contains("19.2 ms"), "{text}");
        assert!(!text.contains("vShard 14 "), "only the latest five: {text}");
        assert!(render_migrations(&[]).is_empty());
    }

    /// A node that was decommissioned while away answers from metadata
    /// that no longer changes; the report must not pass that off as the
    /// cluster's state.
    #[test]
    fn a_view_from_a_retired_node_is_flagged_as_possibly_stale() {
        let node = |id| NodeId::new(id).expect("node id");
        let each: Vec<_> = (1..=3)
            .map(|id| (node(id), addr(id), Some(status(id, vec![]))))
            .collect();
        let mut first = status(1, vec![]);
        assert!(assemble(&first, &each).healthy);
        first.local.retired = true;
        let report = assemble(&first, &each);
        assert!(!report.healthy);
        assert!(
            report.problems[0].contains("node 1 answered, but it was decommissioned"),
            "{:?}",
            report.problems
        );
    }
}
