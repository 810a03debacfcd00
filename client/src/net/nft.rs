//! warren's nftables table, `ip warren`, rendered whole from the desired state.
//!
//! The table is replaced in one `nft -j -f -` transaction (add, delete, add again, then every
//! chain and rule), so there is never a moment with half the rules. A regular chain `state`
//! holds one rule whose comment is the hash of what was rendered: applying the same state again
//! changes nothing, handles included. Other tables (Docker's, the host's) are never read or
//! written.
//!
//! Per network, with bridge B and subnet S:
//! - postrouting: `ip saddr S oifname != B masquerade` (egress) and `ip saddr S oifname B ct
//!   status dnat masquerade` (hairpin: an endpoint reaching a published port or a virtual
//!   address that leads back into its own network);
//! - forward: into B, only replies, DNATed connections and B's own traffic; everything else
//!   (other networks, routed access from outside) is dropped;
//! - prerouting and output: one DNAT rule per published port, on local addresses only (`fib
//!   daddr type local`, or the given host address); loopback is left to the agent's own
//!   listener;
//! - per `vip` service: `ip daddr VIP dnat to numgen inc mod N map { ... }` over its healthy
//!   endpoints.

use std::net::Ipv4Addr;
use std::process::Stdio;

use ipnet::Ipv4Net;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use super::model::{NetError, Proto};

/// The table's name (family `ip`).
pub const TABLE: &str = "warren";

/// What the rules are made of.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rules {
    /// (bridge, subnet) per network.
    pub networks: Vec<(String, Ipv4Net)>,
    /// Published ports: (proto, host address, host port, endpoint address, endpoint port).
    pub ports: Vec<(Proto, Option<Ipv4Addr>, u16, Ipv4Addr, u16)>,
    /// Virtual addresses (with their network's bridge) and the endpoint addresses behind
    /// them.
    pub vips: Vec<(String, Ipv4Addr, Vec<Ipv4Addr>)>,
}

fn m(left: Value, op: &str, right: Value) -> Value {
    json!({"match": {"op": op, "left": left, "right": right}})
}

fn meta(key: &str) -> Value {
    json!({"meta": {"key": key}})
}

fn field(proto: &str, f: &str) -> Value {
    json!({"payload": {"protocol": proto, "field": f}})
}

fn prefix(n: &Ipv4Net) -> Value {
    json!({"prefix": {"addr": n.network().to_string(), "len": n.prefix_len()}})
}

fn rule(chain: &str, expr: Vec<Value>) -> Value {
    json!({"add": {"rule": {"family": "ip", "table": TABLE, "chain": chain, "expr": expr}}})
}

fn chain(name: &str, kind: &str, hook: &str, prio: i32) -> Value {
    json!({"add": {"chain": {"family": "ip", "table": TABLE, "name": name, "type": kind,
        "hook": hook, "prio": prio, "policy": "accept"}}})
}

impl Rules {
    fn sorted(&self) -> Self {
        let mut r = self.clone();
        r.networks.sort();
        r.ports.sort();
        for (_, _, eps) in &mut r.vips {
            eps.sort();
        }
        r.vips.sort();
        r
    }

    /// The rule statements (without the table and state bookkeeping).
    fn body(&self) -> Vec<Value> {
        let mut out = vec![
            chain("prerouting", "nat", "prerouting", -100),
            chain("output", "nat", "output", -100),
            chain("postrouting", "nat", "postrouting", 100),
            chain("forward", "filter", "forward", 0),
        ];
        for (bridge, subnet) in &self.networks {
            let saddr = m(field("ip", "saddr"), "==", prefix(subnet));
            out.push(rule(
                "postrouting",
                vec![
                    saddr.clone(),
                    m(meta("oifname"), "!=", json!(bridge)),
                    json!({"masquerade": null}),
                ],
            ));
            out.push(rule(
                "postrouting",
                vec![
                    saddr,
                    m(meta("oifname"), "==", json!(bridge)),
                    m(json!({"ct": {"key": "status"}}), "in", json!("dnat")),
                    json!({"masquerade": null}),
                ],
            ));
            let into = m(meta("oifname"), "==", json!(bridge));
            out.push(rule(
                "forward",
                vec![
                    into.clone(),
                    m(json!({"ct": {"key": "state"}}), "in", json!(["established", "related"])),
                    json!({"accept": null}),
                ],
            ));
            out.push(rule(
                "forward",
                vec![
                    into.clone(),
                    m(json!({"ct": {"key": "status"}}), "in", json!("dnat")),
                    json!({"accept": null}),
                ],
            ));
            out.push(rule(
                "forward",
                vec![
                    into.clone(),
                    m(meta("iifname"), "==", json!(bridge)),
                    json!({"accept": null}),
                ],
            ));
            out.push(rule("forward", vec![into, json!({"drop": null})]));
        }
        for (proto, host_ip, host_port, ip, port) in &self.ports {
            let p = proto.as_str();
            let dnat = json!({"dnat": {"addr": ip.to_string(), "port": port}});
            let dport = m(field(p, "dport"), "==", json!(host_port));
            let local = match host_ip {
                Some(h) => m(field("ip", "daddr"), "==", json!(h.to_string())),
                None => {
                    m(json!({"fib": {"result": "type", "flags": ["daddr"]}}), "==", json!("local"))
                }
            };
            out.push(rule("prerouting", vec![local.clone(), dport.clone(), dnat.clone()]));
            let not_lo =
                m(field("ip", "daddr"), "!=", json!({"prefix": {"addr": "127.0.0.0", "len": 8}}));
            out.push(rule("output", vec![local, not_lo, dport, dnat]));
        }
        for (bridge, vip, eps) in &self.vips {
            if eps.is_empty() {
                continue;
            }
            let map: Vec<Value> =
                eps.iter().enumerate().map(|(i, ip)| json!([i, ip.to_string()])).collect();
            let dnat = json!({"dnat": {"addr": {"map": {
                "key": {"numgen": {"mode": "inc", "mod": eps.len(), "offset": 0}},
                "data": {"set": map}}}}});
            let daddr = m(field("ip", "daddr"), "==", json!(vip.to_string()));
            // Only from its own network: another network's endpoints must not get in by it.
            let from = m(meta("iifname"), "==", json!(bridge));
            out.push(rule("prerouting", vec![from, daddr.clone(), dnat.clone()]));
            out.push(rule("output", vec![daddr, dnat]));
        }
        out
    }

    /// A short fingerprint of the rendered rules.
    pub fn digest(&self) -> String {
        let body = serde_json::to_vec(&self.sorted().body()).unwrap_or_default();
        let d = ring::digest::digest(&ring::digest::SHA256, &body);
        d.as_ref()[..12].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The whole transaction that replaces the table.
    pub fn document(&self) -> Value {
        let sorted = self.sorted();
        let mut cmds = vec![
            json!({"add": {"table": {"family": "ip", "name": TABLE}}}),
            json!({"delete": {"table": {"family": "ip", "name": TABLE}}}),
            json!({"add": {"table": {"family": "ip", "name": TABLE}}}),
            json!({"add": {"chain": {"family": "ip", "table": TABLE, "name": "state"}}}),
            json!({"add": {"rule": {"family": "ip", "table": TABLE, "chain": "state",
                "comment": format!("warren state {}", self.digest()),
                "expr": [{"accept": null}]}}}),
        ];
        cmds.extend(sorted.body());
        json!({"nftables": cmds})
    }
}

async fn nft(args: &[&str], stdin: Option<Vec<u8>>) -> Result<String, NetError> {
    let mut cmd = tokio::process::Command::new("nft");
    cmd.args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| {
        NetError::Unavailable(format!(
            "cannot run `nft` ({e}); install nftables (apt-get install nftables)"
        ))
    })?;
    if let (Some(input), Some(mut w)) = (stdin, child.stdin.take()) {
        w.write_all(&input).await.map_err(|e| NetError::System(format!("nft stdin: {e}")))?;
    }
    let out = child.wait_with_output().await.map_err(|e| NetError::System(format!("nft: {e}")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        if err.contains("Operation not permitted") {
            return Err(NetError::Unavailable(
                "nft: operation not permitted; the agent needs CAP_NET_ADMIN (run it as root)"
                    .into(),
            ));
        }
        Err(NetError::System(format!("nft {}: {err}", args.join(" "))))
    }
}

/// The table as nft lists it (JSON), or None when it does not exist.
pub async fn list() -> Result<Option<Value>, NetError> {
    match nft(&["-j", "list", "table", "ip", TABLE], None).await {
        Ok(s) => serde_json::from_str(&s)
            .map(Some)
            .map_err(|e| NetError::System(format!("nft printed bad JSON: {e}"))),
        Err(NetError::System(e)) if e.contains("No such file") => Ok(None),
        Err(e) => Err(e),
    }
}

/// The listing without handles and nft's metainfo, for comparing two listings.
pub fn normalize(listing: &Value) -> Value {
    fn strip(v: &Value) -> Value {
        match v {
            Value::Object(o) => Value::Object(
                o.iter()
                    .filter(|(k, _)| *k != "handle")
                    .map(|(k, v)| (k.clone(), strip(v)))
                    .collect(),
            ),
            Value::Array(a) => {
                Value::Array(a.iter().filter(|x| x.get("metainfo").is_none()).map(strip).collect())
            }
            other => other.clone(),
        }
    }
    strip(listing)
}

/// The digest recorded in the table's `state` chain, if any.
pub fn recorded_digest(listing: &Value) -> Option<String> {
    listing["nftables"].as_array()?.iter().find_map(|x| {
        let r = x.get("rule")?;
        if r["chain"] != "state" {
            return None;
        }
        r["comment"].as_str()?.strip_prefix("warren state ").map(str::to_owned)
    })
}

/// Makes the table hold exactly `rules`; an empty rule set removes the table. Returns the
/// normalized listing afterwards (None without a table) and whether anything changed.
pub async fn apply(rules: &Rules, force: bool) -> Result<(Option<Value>, bool), NetError> {
    let current = list().await?;
    if rules.networks.is_empty() {
        if current.is_some() {
            nft(&["delete", "table", "ip", TABLE], None).await?;
            return Ok((None, true));
        }
        return Ok((None, false));
    }
    let want = rules.digest();
    if !force && current.as_ref().and_then(recorded_digest).as_deref() == Some(want.as_str()) {
        return Ok((current.as_ref().map(normalize), false));
    }
    let doc = serde_json::to_vec(&rules.document()).unwrap_or_default();
    nft(&["-j", "-f", "-"], Some(doc)).await?;
    Ok((list().await?.as_ref().map(normalize), true))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Rules {
        Rules {
            networks: vec![("wrb-1".into(), "10.213.5.0/24".parse().expect("net"))],
            ports: vec![(Proto::Tcp, None, 8080, Ipv4Addr::new(10, 213, 5, 2), 80)],
            vips: vec![(
                "wrb-1".into(),
                Ipv4Addr::new(10, 213, 5, 9),
                vec![Ipv4Addr::new(10, 213, 5, 3), Ipv4Addr::new(10, 213, 5, 2)],
            )],
        }
    }

    #[test]
    fn the_digest_ignores_order_and_follows_content() {
        let a = sample();
        let mut b = sample();
        b.vips[0].2.reverse();
        assert_eq!(a.digest(), b.digest());
        b.ports[0].2 = 8081;
        assert_ne!(a.digest(), b.digest());
    }

    #[test]
    fn the_document_replaces_the_table_atomically() {
        let doc = sample().document();
        let cmds = doc["nftables"].as_array().expect("list");
        assert_eq!(cmds[0]["add"]["table"]["name"], TABLE);
        assert_eq!(cmds[1]["delete"]["table"]["name"], TABLE);
        let text = doc.to_string();
        assert!(text.contains("\"numgen\""), "{text}");
        assert!(text.contains("\"masquerade\""), "{text}");
        assert!(!text.contains("\"table\":\"nat\""), "touches only its own table: {text}");
    }
}
