//! `warren agent --docker`: containers labelled `warren.http=PORT` (or `warren.tcp`,
//! `warren.tls`, `warren.udp`) get a tunnel to their address while they run.
//!
//! The watcher subscribes to container events first and lists the running containers after,
//! so a container started in between is not missed; it lists them again every
//! [`RESYNC`] in case an event was lost, and reconnects with backoff when the daemon restarts.
//! A container whose labels cannot be honoured (a bad port, an unknown `warren.*` label, which
//! could be a misspelt `warren.basic-auth`) gets no tunnel at all, and the reason is logged.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use warren_proto::{Protocol, Subdomain, TunnelName};

use super::{Container, ContainerSummary, Docker};
use crate::agent::Control;
use crate::tunnel::{OPTION_KEYS, Target, TunnelSpec, protocols_of};

/// How often the running containers are listed again.
pub const RESYNC: Duration = Duration::from_secs(30);

/// How long the agent may take to answer an open or close; past it the request stays queued.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// The label prefix.
pub const PREFIX: &str = "warren.";

const PROTOCOLS: [(&str, Protocol); 4] = [
    ("http", Protocol::Http),
    ("tcp", Protocol::Tcp),
    ("tls", Protocol::Tls),
    ("udp", Protocol::Udp),
];

/// Labels that shape the tunnels rather than carry an option.
const SHAPE: [&str; 4] = ["subdomain", "hostname", "remote-port", "network"];

/// Whether a container asks for a tunnel at all.
pub fn wants_tunnel(labels: &BTreeMap<String, String>) -> bool {
    PROTOCOLS.iter().any(|(p, _)| labels.contains_key(&format!("{PREFIX}{p}")))
}

/// The tunnels a container's labels ask for, or why none can be opened.
pub fn tunnels_for(c: &Container) -> Result<Vec<TunnelSpec>, String> {
    let labels = c.labels();
    let name = c.short_name();
    let label = |k: &str| labels.get(&format!("{PREFIX}{k}")).map(|v| v.trim().to_owned());
    for key in labels.keys().filter_map(|k| k.strip_prefix(PREFIX)) {
        let known = PROTOCOLS.iter().any(|(p, _)| *p == key)
            || SHAPE.contains(&key)
            || OPTION_KEYS.contains(&key.replace('-', "_").as_str());
        if !known {
            let mut all: Vec<String> = PROTOCOLS.iter().map(|(p, _)| (*p).to_owned()).collect();
            all.extend(SHAPE.iter().map(|s| (*s).to_owned()));
            all.extend(OPTION_KEYS.iter().map(|k| k.replace('_', "-")));
            return Err(format!(
                "unknown label {PREFIX}{key}; known: {}",
                all.iter().map(|k| format!("{PREFIX}{k}")).collect::<Vec<_>>().join(", ")
            ));
        }
    }
    let host = address(c, label("network").as_deref())?;
    let mut out = Vec::new();
    for (proto_label, protocol) in PROTOCOLS {
        let Some(port) = label(proto_label) else { continue };
        let port: u16 = port.parse().ok().filter(|p| *p != 0).ok_or_else(|| {
            format!("label {PREFIX}{proto_label}={port}: expected the container's port, 1-65535")
        })?;
        let base: String = name.chars().take(TunnelName::MAX_LEN - proto_label.len() - 1).collect();
        let tname = TunnelName::parse(&format!("{base}-{proto_label}"))
            .map_err(|e| format!("container name {name:?}: {e}"))?;
        let mut spec = TunnelSpec::new(tname, protocol, Target { host: host.to_string(), port });
        spec.container = Some(name.to_owned());
        match protocol {
            Protocol::Http | Protocol::Tls => {
                if let Some(s) = label("subdomain") {
                    spec.subdomain = Some(
                        Subdomain::parse(&s)
                            .map_err(|e| format!("label {PREFIX}subdomain: {e}"))?,
                    );
                }
                spec.hostname = label("hostname");
                if spec.subdomain.is_some() && spec.hostname.is_some() {
                    return Err(format!(
                        "labels {PREFIX}subdomain and {PREFIX}hostname: give one of them"
                    ));
                }
            }
            _ => {
                if let Some(p) = label("remote-port") {
                    spec.remote_port =
                        Some(p.parse().ok().filter(|p| *p != 0).ok_or_else(|| {
                            format!("label {PREFIX}remote-port={p}: expected a port, 1-65535")
                        })?);
                }
            }
        }
        for (key, value) in &labels {
            let Some(k) = key.strip_prefix(PREFIX) else { continue };
            let option = k.replace('-', "_");
            // Options that do not fit this protocol are left to the tunnels they fit.
            if !OPTION_KEYS.contains(&option.as_str()) || !protocols_of(&option).contains(&protocol)
            {
                continue;
            }
            // Lists of networks may be given comma-separated; other values are taken whole.
            let values: Vec<&str> = if matches!(option.as_str(), "allow" | "deny") {
                value.split(',').map(str::trim).filter(|v| !v.is_empty()).collect()
            } else {
                vec![value.trim()]
            };
            for v in values {
                spec.apply(&option, v).map_err(|e| format!("label {key}: {e}"))?;
            }
        }
        spec.check()?;
        out.push(spec);
    }
    Ok(out)
}

/// The address to reach `c` at: on `network` when given, else on its first network (by name)
/// with an address; loopback for `--network host`.
fn address(c: &Container, network: Option<&str>) -> Result<IpAddr, String> {
    let nets = c.networks();
    if let Some(n) = network {
        let Some(cn) = nets.get(n) else {
            return Err(format!(
                "label {PREFIX}network={n}: the container is not on that network (it is on {})",
                nets.keys().cloned().collect::<Vec<_>>().join(", ")
            ));
        };
        return cn
            .ip_address
            .parse()
            .map_err(|_| format!("the container has no address on network {n}"));
    }
    if nets.contains_key("host") {
        return Ok(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    nets.values().find_map(|n| n.ip_address.parse().ok()).ok_or_else(|| {
        "the container has no IP address (network mode none, or a container's network?): \
         put the tunnel in that container's network namespace with a sidecar instead"
            .to_owned()
    })
}

/// Runs the watcher of the daemon at `socket` until `shutdown`; tunnels go through `control`.
pub async fn run(socket: PathBuf, control: mpsc::Sender<Control>, shutdown: CancellationToken) {
    let mut slot: Option<Watcher> = None;
    let mut attempt = 0u32;
    loop {
        let filters = serde_json::json!({
            "type": ["container"],
            "event": ["start", "die", "destroy", "unpause", "pause"],
        });
        let connected = match Docker::connect(&socket).await {
            Ok(docker) => docker.events(&filters).await.map(|rx| (docker, rx)),
            Err(e) => Err(e),
        };
        let (w, mut events) = match connected {
            Ok((docker, rx)) => {
                let w = slot.get_or_insert_with(|| Watcher {
                    docker: docker.clone(),
                    control: control.clone(),
                    open: HashMap::new(),
                });
                w.docker = docker;
                (w, rx)
            }
            Err(e) => {
                let wait = crate::agent::backoff(attempt);
                attempt = attempt.saturating_add(1);
                tracing::warn!("docker: {e}; trying again in {wait:?}");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(wait) => continue,
                }
            }
        };
        attempt = 0;
        tracing::info!(api = w.docker.version(), "docker: watching containers for warren.* labels");
        w.resync().await;
        let mut tick = tokio::time::interval(RESYNC);
        tick.tick().await;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                ev = events.recv() => match ev {
                    Some(ev) => match ev.action.as_str() {
                        "start" | "unpause" => w.follow(&ev.actor.id).await,
                        _ => w.close(&ev.actor.id).await,
                    },
                    None => {
                        tracing::warn!("docker: the event stream ended; reconnecting");
                        break;
                    }
                },
                _ = tick.tick() => w.resync().await,
            }
        }
    }
}

struct Watcher {
    docker: Docker,
    control: mpsc::Sender<Control>,
    /// The tunnels opened, by container id.
    open: HashMap<String, Vec<TunnelSpec>>,
}

impl Watcher {
    /// Lists the running containers: opens what is missing, closes what no longer runs.
    async fn resync(&mut self) {
        let list: Vec<ContainerSummary> = match self.docker.get("/containers/json").await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("docker: cannot list containers: {e}");
                return;
            }
        };
        let running: Vec<String> = list
            .iter()
            .filter(|c| wants_tunnel(&c.labels.clone().unwrap_or_default()))
            .map(|c| c.id.clone())
            .collect();
        let gone: Vec<String> =
            self.open.keys().filter(|id| !running.contains(id)).cloned().collect();
        for id in gone {
            self.close(&id).await;
        }
        for id in running {
            self.follow(&id).await;
        }
    }

    /// Makes the tunnels of container `id` match its labels.
    async fn follow(&mut self, id: &str) {
        let c: Container = match self.docker.get(&format!("/containers/{id}/json")).await {
            Ok(c) => c,
            Err(e) if e.is_not_found() => return self.close(id).await,
            Err(e) => return tracing::warn!("docker: container {id:.12}: {e}"),
        };
        if !c.state.running || c.state.paused || !wants_tunnel(&c.labels()) {
            return self.close(id).await;
        }
        let want = match tunnels_for(&c) {
            Ok(w) => w,
            Err(why) => {
                tracing::warn!("docker: container {}: no tunnel: {why}", c.short_name());
                return self.close(id).await;
            }
        };
        let have = self.open.remove(id).unwrap_or_default();
        let mut kept = Vec::new();
        for spec in have {
            if want.contains(&spec) {
                kept.push(spec);
            } else {
                self.remove(&spec).await;
            }
        }
        for spec in want {
            if kept.contains(&spec) {
                continue;
            }
            if self.add(spec.clone()).await {
                kept.push(spec);
            }
        }
        self.open.insert(id.to_owned(), kept);
    }

    /// Closes the tunnels of container `id`.
    async fn close(&mut self, id: &str) {
        for spec in self.open.remove(id).unwrap_or_default() {
            self.remove(&spec).await;
        }
    }

    async fn add(&self, spec: TunnelSpec) -> bool {
        let (tx, rx) = oneshot::channel();
        let (name, container, target) =
            (spec.name.clone(), spec.container.clone().unwrap_or_default(), spec.target.clone());
        if self.control.send(Control::Add(Box::new(spec), tx)).await.is_err() {
            return false;
        }
        match tokio::time::timeout(REPLY_TIMEOUT, rx).await {
            // The session ended (or is being re-made) before the relay answered: the tunnel
            // is kept in the agent's list and bound on the next session.
            Err(_) | Ok(Err(_)) => {
                tracing::info!(tunnel = %name, "docker: container {container}: tunnel queued until the relay answers");
                true
            }
            Ok(Ok(Ok(url))) => {
                tracing::info!(
                    tunnel = %name,
                    url = url.as_deref().unwrap_or("(when the relay is back)"),
                    "docker: container {container} exposed ({target})"
                );
                true
            }
            Ok(Ok(Err(why))) => {
                tracing::warn!("docker: container {container}: tunnel {name} refused: {why}");
                false
            }
        }
    }

    async fn remove(&self, spec: &TunnelSpec) {
        let (tx, rx) = oneshot::channel();
        if self.control.send(Control::Remove(spec.name.clone(), tx)).await.is_ok()
            && tokio::time::timeout(REPLY_TIMEOUT, rx).await.is_ok_and(|r| r == Ok(true))
        {
            tracing::info!(
                tunnel = %spec.name,
                "docker: container {} stopped or changed; tunnel closed",
                spec.container.as_deref().unwrap_or("?")
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(labels: &[(&str, &str)]) -> Container {
        let labels: serde_json::Map<String, serde_json::Value> =
            labels.iter().map(|(k, v)| ((*k).to_owned(), serde_json::json!(v))).collect();
        serde_json::from_value(serde_json::json!({
            "Id": "0123456789abcdef", "Name": "/shop",
            "Config": { "Labels": labels },
            "State": { "Running": true },
            "NetworkSettings": { "Networks": { "bridge": { "IPAddress": "172.17.0.5" } } },
        }))
        .expect("container")
    }

    #[test]
    fn labels_make_tunnels() {
        let c = container(&[
            ("warren.http", "80"),
            ("warren.tcp", "5432"),
            ("warren.subdomain", "shop"),
            ("warren.basic-auth", "ann:s3cret"),
            ("warren.allow", "10.0.0.0/8, 192.168.0.0/16"),
            ("com.example.other", "x"),
        ]);
        let t = tunnels_for(&c).expect("tunnels");
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].name.as_str(), "shop-http");
        assert_eq!(t[0].target.to_string(), "172.17.0.5:80");
        assert_eq!(t[0].subdomain.as_ref().map(Subdomain::as_str), Some("shop"));
        assert_eq!(t[0].options.basic_auth.len(), 1);
        assert_eq!(t[0].options.allow.len(), 2);
        assert_eq!(t[0].container.as_deref(), Some("shop"));
        assert_eq!(t[1].name.as_str(), "shop-tcp");
        assert_eq!(t[1].protocol, Protocol::Tcp);
        assert!(t[1].options.basic_auth.is_empty(), "basic auth is HTTP's alone");
        assert_eq!(t[1].options.allow.len(), 2);
    }

    #[test]
    fn bad_labels_open_nothing() {
        for (labels, want) in [
            (vec![("warren.http", "eighty")], "expected the container's port"),
            (vec![("warren.http", "80"), ("warren.basicauth", "a:b")], "unknown label"),
            (vec![("warren.http", "80"), ("warren.subdomain", "no_underscores")], "subdomain"),
            (vec![("warren.tcp", "1"), ("warren.remote-port", "0")], "remote-port"),
            (vec![("warren.http", "80"), ("warren.network", "elsewhere")], "not on that network"),
        ] {
            let err = tunnels_for(&container(&labels)).expect_err("refused");
            assert!(err.contains(want), "{labels:?}: {err}");
        }
    }

    #[test]
    fn only_protocol_labels_ask_for_tunnels() {
        let l = |k: &str| BTreeMap::from([(k.to_owned(), "1".to_owned())]);
        assert!(wants_tunnel(&l("warren.udp")));
        assert!(!wants_tunnel(&l("warren.subdomain")));
        assert!(!wants_tunnel(&l("http")));
    }
}
