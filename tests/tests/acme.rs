//! Certificates from an ACME CA: the relay against pebble, Let's Encrypt's test CA (Debian
//! package `pebble`), which really validates HTTP-01 challenges by fetching
//! `http://NAME/.well-known/acme-challenge/TOKEN` from the relay's HTTP listener. Names resolve
//! through `pebble-challtestsrv`, a mock DNS server answering 127.0.0.1 for every name.

use std::time::Duration;

use warren_tests::{
    Agent, Daemon, HttpBackend, Pki, READY_TIMEOUT, Relay, RelayOpts, TempDir, closed_port,
    eventually,
};

/// How long pebble may take to validate and issue.
const ISSUE_TIMEOUT: Duration = Duration::from_secs(60);

/// A running pebble and its mock DNS; killed on drop.
struct Pebble {
    dir_url: String,
    mgmt_port: u16,
    /// The root that signed pebble's own HTTPS certificate (for `--acme-ca` and curl).
    listener_ca: std::path::PathBuf,
    _dns: Daemon,
    _pebble: Daemon,
}

impl Pebble {
    /// Starts pebble validating HTTP-01 challenges on `http_port` of 127.0.0.1.
    async fn start(pki: &Pki, http_port: u16) -> Self {
        let listener_ca = pki.ca("pebble-listener-ca");
        let (cert, key) = pki.leaf_san(
            "pebble-listener",
            "pebble-listener-ca",
            "localhost",
            "DNS:localhost,IP:127.0.0.1",
        );
        let (acme_port, mgmt_port, dns_port) = (closed_port(), closed_port(), closed_port());
        let config = pki.path("pebble.json");
        std::fs::write(
            &config,
            format!(
                r#"{{"pebble": {{"listenAddress": "127.0.0.1:{acme_port}",
                "managementListenAddress": "127.0.0.1:{mgmt_port}",
                "certificate": "{}", "privateKey": "{}",
                "httpPort": {http_port}, "tlsPort": {},
                "ocspResponderURL": "", "externalAccountBindingRequired": false}}}}"#,
                cert.display(),
                key.display(),
                closed_port(),
            ),
        )
        .expect("write pebble.json");
        let dns = Daemon::spawn(
            "challtestsrv",
            "pebble-challtestsrv",
            &[
                "-defaultIPv4".into(),
                "127.0.0.1".into(),
                "-defaultIPv6".into(),
                String::new(),
                "-dns01".into(),
                format!("127.0.0.1:{dns_port}"),
                "-http01".into(),
                String::new(),
                "-https01".into(),
                String::new(),
                "-tlsalpn01".into(),
                String::new(),
            ],
            &[],
        );
        let pebble = Daemon::spawn(
            "pebble",
            "pebble",
            &[
                "-config".into(),
                config.display().to_string(),
                "-dnsserver".into(),
                format!("127.0.0.1:{dns_port}"),
            ],
            // No random sleeps before validation, no random nonce rejections.
            &[("PEBBLE_VA_NOSLEEP", "1"), ("PEBBLE_WFE_NONCEREJECT", "0")],
        );
        let mut this = Self {
            dir_url: format!("https://127.0.0.1:{acme_port}/dir"),
            mgmt_port,
            listener_ca,
            _dns: dns,
            _pebble: pebble,
        };
        eventually(READY_TIMEOUT, || {
            let ok = this._pebble.output().contains("ACME directory available")
                && this._dns.output().contains("Starting challenge servers");
            async move { if ok { Ok(()) } else { anyhow::bail!("pebble or its DNS not up yet") } }
        })
        .await;
        assert!(this._pebble.is_running(), "pebble exited:\n{}", this._pebble.output());
        this
    }

    /// The root pebble issues under (it makes a new one at every start).
    async fn issuing_root(&self, into: &std::path::Path) {
        let out = curl(&[
            "--cacert",
            &self.listener_ca.display().to_string(),
            &format!("https://127.0.0.1:{}/roots/0", self.mgmt_port),
            "-o",
            &into.display().to_string(),
        ])
        .await;
        assert!(out.status.success(), "cannot fetch pebble's root: {out:?}");
    }
}

async fn curl(args: &[&str]) -> std::process::Output {
    tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .await
        .expect("run curl")
}

/// A relay ordering certificates from a pebble that validates against its HTTP listener, with
/// `extra` relay arguments.
async fn relay_with_pebble(pki: &Pki, extra: &[&str]) -> (Relay, Pebble) {
    // The relay must know pebble's address, and pebble the relay's HTTP port: reserve pebble's
    // ports first through a relay started with a placeholder, then restart it on the same ports.
    let pebble_ca = pki.path("pebble-listener-ca.pem");
    let acme_port_hint = closed_port();
    let placeholder = format!("https://127.0.0.1:{acme_port_hint}/dir");
    let acme_args = |directory: &str, ca: &str| {
        let mut args = vec!["--acme-email", "ops@example.com", "--acme-directory"];
        args.extend([directory, "--acme-ca", ca]);
        args.extend(extra);
        args.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let first = acme_args(&placeholder, &pebble_ca.display().to_string());
    let first: Vec<&str> = first.iter().map(String::as_str).collect();
    let mut relay = Relay::start(RelayOpts::default().args(&first)).await;
    let pebble = Pebble::start(pki, relay.http_addr.port()).await;
    let real = acme_args(&pebble.dir_url, &pebble.listener_ca.display().to_string());
    relay.set_extra_args(&real.iter().map(String::as_str).collect::<Vec<_>>());
    relay.restart().await;
    (relay, pebble)
}

/// `warren http PORT --subdomain SUB` against `relay`, waited until bound.
async fn http_agent(relay: &Relay, tmp: &TempDir, port: u16, sub: &str) -> Agent {
    let mut agent = relay.spawn_agent(
        sub,
        [
            "http".to_owned(),
            port.to_string(),
            "--subdomain".into(),
            sub.into(),
            "--config-dir".into(),
            tmp.dir(sub).display().to_string(),
        ],
    );
    let _ = agent.url().await;
    agent
}

/// `curl https://SUB.localhost:PORT/` trusting only `root`: the body, or why it failed.
async fn get_trusting(
    root: &std::path::Path,
    https_port: u16,
    sub: &str,
) -> anyhow::Result<String> {
    let url = format!("https://{sub}.localhost:{https_port}/");
    let resolve = format!("{sub}.localhost:{https_port}:127.0.0.1");
    let root = root.display().to_string();
    let out = curl(&["--cacert", &root, "--resolve", &resolve, &url]).await;
    if !out.status.success() {
        anyhow::bail!("curl: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// An HTTP tunnel bound on a relay with `--acme-email` gets a certificate from the ACME CA,
/// which visitors trusting only that CA accept; after a relay restart it is served at once
/// from the data directory, without a new order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_tunnel_gets_a_certificate_from_acme() {
    let pki = Pki::new("acme-pki");
    let tmp = TempDir::new("acme");
    let (mut relay, pebble) = relay_with_pebble(&pki, &[]).await;
    let backend = HttpBackend::start().await;
    let _agent = http_agent(&relay, &tmp, backend.port(), "acmeshop").await;

    let root = tmp.join("pebble-root.pem");
    pebble.issuing_root(&root).await;
    let https_port = relay.https_addr.port();
    let url = format!("https://acmeshop.localhost:{https_port}/");
    let resolve = format!("acmeshop.localhost:{https_port}:127.0.0.1");
    let root_arg = root.display().to_string();
    // Trusting only pebble's root: fails while the development certificate is served, works
    // once the ACME certificate is in.
    let body = eventually(ISSUE_TIMEOUT, || get_trusting(&root, https_port, "acmeshop")).await;
    assert_eq!(body, backend.greeting());
    assert!(
        relay.stderr().iter().any(|l| l.contains("certificate from ACME installed")),
        "no installation logged"
    );
    let data = relay.data_dir.join("acme");
    assert!(data.join("account.json").is_file(), "account not kept");
    assert!(data.join("certs/acmeshop.localhost.pem").is_file(), "certificate not kept");

    // A restart serves the stored certificate at once: no new order.
    relay.restart().await;
    let out = curl(&["--cacert", &root_arg, "--resolve", &resolve, &url]).await;
    assert!(out.status.success(), "stored ACME certificate not served after a restart: {out:?}");
    let since_restart = relay.stderr();
    let restart_at = since_restart
        .iter()
        .rposition(|l| l.contains("test harness: relay (re)start"))
        .expect("restart marker");
    assert!(
        since_restart[restart_at..].iter().any(|l| l.contains("certificate from ACME loaded")),
        "the stored certificate was not loaded at start"
    );
    // The agent reconnects and binds again; the name is covered, so nothing is ordered.
    eventually(READY_TIMEOUT, || {
        let bound = relay.stderr()[restart_at..].iter().any(|l| l.contains("tunnel bound"));
        async move { if bound { Ok(()) } else { anyhow::bail!("agent not bound again yet") } }
    })
    .await;
    assert!(
        !relay.stderr()[restart_at..].iter().any(|l| l.contains("ordering a certificate")),
        "a covered name was ordered again"
    );
}

/// With `--acme-orders-per-hour 1`, the second HTTP name is not ordered within the hour: the
/// relay says once that names wait, serves that name with the fallback certificate, and the
/// first name still gets its certificate from the CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_orders_stay_within_the_hourly_budget() {
    let pki = Pki::new("acme-budget-pki");
    let tmp = TempDir::new("acme-budget");
    let (relay, pebble) = relay_with_pebble(&pki, &["--acme-orders-per-hour", "1"]).await;
    let backend = HttpBackend::start().await;
    let _first = http_agent(&relay, &tmp, backend.port(), "budget-one").await;
    let _second = http_agent(&relay, &tmp, backend.port(), "budget-two").await;
    let _third = http_agent(&relay, &tmp, backend.port(), "budget-three").await;

    let root = tmp.join("pebble-root.pem");
    pebble.issuing_root(&root).await;
    let https_port = relay.https_addr.port();
    let body = eventually(ISSUE_TIMEOUT, || get_trusting(&root, https_port, "budget-one")).await;
    assert_eq!(body, backend.greeting());

    let lines = relay.stderr();
    let ordered: Vec<&String> =
        lines.iter().filter(|l| l.contains("ordering a certificate")).collect();
    assert_eq!(ordered.len(), 1, "one order in the hour, not {}: {ordered:#?}", ordered.len());
    assert!(ordered[0].contains("budget-one.localhost"), "{ordered:?}");
    let told = lines.iter().filter(|l| l.contains("ACME order budget used up")).count();
    assert_eq!(told, 1, "the waiting names should be said once in the log");
    let err = get_trusting(&root, https_port, "budget-two").await.expect_err("no ACME certificate");
    assert!(err.to_string().contains("curl"), "{err}");
    // Served all the same, with the fallback certificate.
    let dev_ca = relay.ca_path.display().to_string();
    let resolve = format!("budget-two.localhost:{https_port}:127.0.0.1");
    let url = format!("https://budget-two.localhost:{https_port}/");
    let out = curl(&["--cacert", &dev_ca, "--resolve", &resolve, &url]).await;
    assert!(out.status.success(), "the waiting name is not served: {out:?}");
}
