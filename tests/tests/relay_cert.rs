//! The relay's certificate against the addresses agents dial: a relay told to listen on a
//! specific address names it in its certificate, and an agent refused by the relay's certificate
//! says whether the CA or the name was wrong, naming the host it dialled.

use std::time::Duration;

use warren_tests::{HttpBackend, HttpSetup, Relay, RelayOpts, TempDir, Transport};

warren_tests::each_transport!(
    specific_control_address_is_in_the_certificate,
    wrong_name_hint_names_the_host,
    foreign_ca_hint_asks_for_the_relays_ca,
);

/// How long an agent refused by the relay's certificate may take to give up.
const REFUSAL: Duration = Duration::from_secs(20);

/// A relay whose control port is on 127.0.0.2 (not 127.0.0.1): an agent dialling that address
/// with the relay's CA binds its tunnel.
async fn specific_control_address_is_in_the_certificate(t: Transport) {
    let s = HttpSetup::start_with(RelayOpts::default().control("127.0.0.2:0"), t).await;
    assert_eq!(s.relay.control_addr.ip().to_string(), "127.0.0.2");
    assert!(!s.url.subdomain.is_empty(), "the agent bound no named tunnel: {}", s.url.url);
}

/// Spawns `warren http` at `relay_arg` with `relay`'s token and the CA at `ca`, and returns its
/// stderr after it failed (panics if it binds or keeps running).
async fn refused_agent(t: Transport, relay: &Relay, relay_arg: &str, ca: &str) -> String {
    let tmp = TempDir::new("cert-agent");
    let backend = HttpBackend::start().await;
    let port = backend.port().to_string();
    let config_dir = tmp.dir("agent").display().to_string();
    let args = [
        "http",
        &port,
        "--transport",
        t.as_str(),
        "--relay",
        relay_arg,
        "--token",
        relay.token(),
        "--relay-ca",
        ca,
        "--config-dir",
        &config_dir,
    ];
    let mut agent = warren_tests::Agent::spawn("cert-agent", args);
    // Fatal on the first connection: an untrusted certificate is not retried.
    agent.expect_failure(REFUSAL).await
}

/// A relay listening on the unspecified address names no extra IP: an agent dialling 127.0.0.4
/// with the right CA exits with the hint to start the relay with `--tls-name 127.0.0.4`.
async fn wrong_name_hint_names_the_host(t: Transport) {
    let relay = Relay::start(RelayOpts::default().control("0.0.0.0:0")).await;
    let relay_arg = format!("127.0.0.4:{}", relay.control_addr.port());
    let ca = relay.ca_path.display().to_string();
    let stderr = refused_agent(t, &relay, &relay_arg, &ca).await;
    assert!(
        stderr.contains("does not name 127.0.0.4") && stderr.contains("--tls-name 127.0.0.4"),
        "the agent must say the certificate does not name the host it dialled; stderr:\n{stderr}"
    );
    assert!(
        !stderr.contains("pass --relay-ca"),
        "the agent already has the right CA; it must not be told to pass --relay-ca:\n{stderr}"
    );
}

/// An agent given another relay's CA exits with the hint to pass the relay's own CA.
async fn foreign_ca_hint_asks_for_the_relays_ca(t: Transport) {
    let relay = Relay::start_default().await;
    let other = Relay::start_default().await;
    let ca = other.ca_path.display().to_string();
    let stderr = refused_agent(t, &relay, &relay.relay_arg(), &ca).await;
    assert!(
        stderr.contains("signed by a CA this agent does not trust")
            && stderr.contains("--relay-ca FILE with the relay's DATA/ca.pem")
            && stderr.contains("--relay-fingerprint"),
        "the agent must say the relay's CA is not trusted and how to trust it; stderr:\n{stderr}"
    );
    assert!(!stderr.contains("--tls-name"), "the name was not the problem:\n{stderr}");
}
