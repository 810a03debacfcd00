//! Tunnel identity: commands of one agent identity that ask for different URLs get tunnels of
//! their own, the same command run again gets its URL back, and a real takeover (same identity,
//! same tunnel name) stops the agent that lost the tunnel, loudly, instead of leaving it
//! running with nothing to serve.

use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::Value;
use warren_tests::{
    ADMIN_TOKEN, ApiClient, HttpBackend, READY_TIMEOUT, Relay, RelayOpts, TempDir, Transport,
    eventually, expect_get,
};

/// How long to wait for the agent that lost its tunnel to exit (it must within 1 s; this is the
/// hang guard).
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);

/// `warren http PORT ARGS... --config-dir DIR`: every agent of a test shares DIR, so they are
/// one identity, as two commands typed on one machine are.
fn http_args(port: u16, dir: &str, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["http".to_owned(), port.to_string()];
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    args.extend(["--config-dir".to_owned(), dir.to_owned()]);
    args
}

/// The tunnels the relay holds, from its admin API.
async fn relay_tunnels(relay: &Relay) -> Vec<Value> {
    let v = ApiClient::new(relay.api_addr, ADMIN_TOKEN)
        .get("/api/v1/tunnels")
        .await
        .expect(StatusCode::OK);
    v["tunnels"].as_array().cloned().unwrap_or_else(|| panic!("no tunnels array in {v}"))
}

/// A relay keeping leases for 5 minutes, a backend, and the config directory every agent of
/// the test shares.
async fn setup(label: &str) -> (TempDir, Relay, HttpBackend, String) {
    let tmp = TempDir::new(label);
    let relay = Relay::start(RelayOpts::default().lease_grace("5m")).await;
    let web = HttpBackend::start().await;
    let dir = tmp.dir("agent").display().to_string();
    (tmp, relay, web, dir)
}

/// Waits until `host` at the relay answers with `web`'s greeting.
async fn serves(relay: &Relay, host: &str, web: &HttpBackend) {
    let (addr, greeting) = (relay.http_addr, web.greeting());
    eventually(READY_TIMEOUT, || {
        let (host, greeting) = (host.to_owned(), greeting.clone());
        async move { expect_get(addr, &host, &greeting).await }
    })
    .await;
}

/// Two commands with the same target but different subdomains, one identity: two tunnels, both
/// URLs answer, and neither agent is stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_subdomains_get_two_tunnels() {
    let (_tmp, relay, web, dir) = setup("takeover-two").await;

    let mut a = relay.spawn_agent("sub-a", http_args(web.port(), &dir, &["--subdomain", "tk-a"]));
    let url_a = a.http_url().await;
    let mut b = relay.spawn_agent("sub-b", http_args(web.port(), &dir, &["--subdomain", "tk-b"]));
    let url_b = b.http_url().await;
    assert_ne!(url_a.host(), url_b.host());

    // Both URLs answer, for as long as it takes the relay to settle, and keep answering.
    for url in [&url_a, &url_b] {
        serves(&relay, &url.host(), &web).await;
    }
    let tunnels = relay_tunnels(&relay).await;
    assert_eq!(tunnels.len(), 2, "want two tunnels at the relay: {tunnels:#?}");
    for url in [&url_a, &url_b] {
        expect_get(relay.http_addr, &url.host(), &web.greeting())
            .await
            .unwrap_or_else(|e| panic!("{} after both bound: {e:#}", url.host()));
    }
    a.assert_running();
    b.assert_running();
}

warren_tests::each_transport!(a_takeover_stops_the_loser);

/// The same command twice with the same `--name`: the second takes the tunnel over and serves;
/// the first logs a WARN naming where the new holder connected from and exits non-zero within
/// 1 s.
async fn a_takeover_stops_the_loser(t: Transport) {
    let (_tmp, relay, web, dir) = setup("takeover-same").await;
    let args = http_args(web.port(), &dir, &["--name", "x", "--transport", t.as_str()]);

    let mut first = relay.spawn_agent("first", &args);
    let url = first.http_url().await;
    let mut second = relay.spawn_agent("second", &args);
    assert_eq!(second.http_url().await.host(), url.host(), "the lease goes to the newer session");
    // The relay told the first before it answered the second's bind.
    let taken = Instant::now();

    let log = first.expect_failure(EXIT_TIMEOUT).await;
    let exited = taken.elapsed();
    assert!(
        exited <= Duration::from_secs(1),
        "the first agent exited {exited:?} after the second was bound, over {}",
        t.as_str()
    );
    assert!(
        log.lines().any(|l| l.contains("WARN")
            && l.contains("took the tunnel over")
            && l.contains("from 127.0.0.1:")),
        "the first agent should log a WARN naming the new holder's address:\n{log}"
    );
    expect_get(relay.http_addr, &url.host(), &web.greeting()).await.expect("the second serves");
    second.assert_running();
    let tunnels = relay_tunnels(&relay).await;
    assert_eq!(tunnels.len(), 1, "want one tunnel at the relay: {tunnels:#?}");
}

/// The same command run again after the first stopped gets the same URL back: the default
/// name is stable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_command_again_gets_its_url_back() {
    let (_tmp, relay, web, dir) = setup("takeover-again").await;
    for extra in [&[][..], &["--subdomain", "tk-again"][..]] {
        let args = http_args(web.port(), &dir, extra);
        let mut first = relay.spawn_agent("again-1", &args);
        let url = first.http_url().await;
        first.kill().await;
        let mut second = relay.spawn_agent("again-2", &args);
        let again = second.http_url().await;
        assert_eq!(again.host(), url.host(), "{extra:?}: the same command, the same URL");
        serves(&relay, &again.host(), &web).await;
        second.assert_running();
        second.kill().await;
    }
}
