//! Both APIs tried as an attacker would, against the real binaries: web pages (cross-site
//! "simple" POSTs, DNS rebinding, foreign origins), callers without or with wrong tokens, a
//! process squatting the agent's API port, and forwards into an agent that did not consent.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use serde_json::Value;
use warren_tests::{
    ADMIN_TOKEN, AGENT_API_TOKEN, Agent, HttpBackend, IO_TIMEOUT, Relay, RelayOpts, TempDir,
    eventually, expect_get, within,
};

/// What `curl` got: status, headers (lower-cased names) and body.
#[derive(Debug)]
struct Got {
    status: u16,
    headers: String,
    body: String,
}

impl Got {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }
}

/// `curl -X METHOD URL` with raw `-H` headers and an optional body sent as given.
async fn curl(method: &str, url: &str, headers: &[&str], body: Option<&str>) -> Got {
    let dir = std::env::temp_dir().join(warren_tests::util::unique("curl-head"));
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args(["-sS", "--max-time", "20", "-X", method, "-D"])
        .arg(&dir)
        .args(["-w", "\n%{http_code}"]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    if let Some(b) = body {
        cmd.args(["--data-binary", b]);
    }
    let out = cmd.arg(url).output().await.expect("run curl");
    assert!(out.status.success(), "curl {method} {url}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    let headers = std::fs::read_to_string(&dir).unwrap_or_default();
    let _ = std::fs::remove_file(&dir);
    Got { status: code.trim().parse().unwrap_or(0), headers, body: body.to_owned() }
}

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}")
}

/// Runs `warren ARGS` with `envs` (the harness's defaults scrubbed first): exit code, stdout,
/// stderr.
async fn cli(args: &[&str], envs: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut cmd = tokio::process::Command::new(warren_tests::process::binary("warren"));
    cmd.args(args);
    for k in ["WARREN_AGENT_API", "WARREN_API_TOKEN", "WARREN_CONFIG_DIR", "WARREN_API"] {
        cmd.env_remove(k);
    }
    cmd.envs(envs.iter().copied());
    let out = within(IO_TIMEOUT * 2, "warren CLI", cmd.output()).await.expect("run warren");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The agent's API refuses what a web page or a stranger can send: a cross-site "simple" POST
/// (403), a `text/plain` body (415), a rebound `Host` (421), no or a wrong token (401); its
/// answers carry the security headers; no tunnel may publish the API itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_api_refuses_web_pages_and_strangers() {
    let tmp = TempDir::new("sec-agent-api");
    let relay = Relay::start(RelayOpts::default()).await;
    let backend = HttpBackend::start().await;
    let mut agent = relay.spawn_tunnel(&tmp, "http", "web", backend.port(), &[]);
    agent.http_url().await;
    let api = agent.api_addr().await;
    let base = format!("http://{api}");
    let auth = bearer(AGENT_API_TOKEN);
    let pwn = r#"{"name":"pwn","proto":"tcp","addr":"127.0.0.1:22"}"#;

    // The exact request a web page can make without CORS: text/plain, foreign Origin.
    let got = curl(
        "POST",
        &format!("{base}/api/tunnels"),
        &["Content-Type: text/plain", "Origin: http://evil.example"],
        Some(pwn),
    )
    .await;
    assert_eq!(got.status, 403, "{got:?}");
    assert_eq!(got.json()["error"]["code"], "cross_origin", "{got:?}");
    // Even with the token, a foreign origin is refused (no CORS, whatever the method).
    let got =
        curl("GET", &format!("{base}/api/tunnels"), &[&auth, "Origin: http://evil.example"], None)
            .await;
    assert_eq!(got.status, 403, "{got:?}");
    // The same origin is fine.
    let own = format!("Origin: http://{api}");
    let got = curl("GET", &format!("{base}/api/tunnels"), &[&auth, &own], None).await;
    assert_eq!(got.status, 200, "{got:?}");
    // A body that is not JSON never reaches a handler.
    let got = curl(
        "POST",
        &format!("{base}/api/tunnels"),
        &[&auth, "Content-Type: text/plain"],
        Some(pwn),
    )
    .await;
    assert_eq!(got.status, 415, "{got:?}");
    let got = curl(
        "POST",
        &format!("{base}/api/tunnels"),
        &[&auth, "Content-Type: application/x-www-form-urlencoded"],
        Some("name=pwn"),
    )
    .await;
    assert_eq!(got.status, 415, "{got:?}");
    // DNS rebinding: the page's own name, resolved to 127.0.0.1.
    let got =
        curl("GET", &format!("{base}/api/tunnels"), &[&auth, "Host: evil.example:4040"], None)
            .await;
    assert_eq!(got.status, 421, "{got:?}");
    let got =
        curl("GET", &format!("{base}/api/networks"), &[&auth, "Host: evil.example"], None).await;
    assert_eq!(got.status, 421, "{got:?}");
    // No token, a wrong token: 401 on every route but the dashboard's files.
    for path in ["/api/tunnels", "/api/status", "/api/requests/http", "/api/networks", "/metrics"] {
        let got = curl("GET", &format!("{base}{path}"), &[], None).await;
        assert_eq!(got.status, 401, "{path}: {got:?}");
        assert_eq!(got.header("www-authenticate").as_deref(), Some("Bearer"), "{got:?}");
    }
    let got = curl("GET", &format!("{base}/api/tunnels"), &[&bearer("not-the-token")], None).await;
    assert_eq!(got.status, 401, "{got:?}");
    // Nothing of the above opened a tunnel.
    let got = curl("GET", &format!("{base}/api/tunnels"), &[&auth], None).await;
    assert_eq!(warren_tests::api_client::tunnel_names(&got.json()), ["web"], "{got:?}");

    // The dashboard's page is open (it asks for the token) and carries the security headers.
    let page = curl("GET", &format!("{base}/"), &[], None).await;
    assert_eq!(page.status, 200);
    let csp = page.header("content-security-policy").unwrap_or_default();
    assert!(csp.contains("frame-ancestors 'none'") && csp.contains("default-src 'self'"), "{csp}");
    assert_eq!(page.header("x-content-type-options").as_deref(), Some("nosniff"));
    assert!(page.header("access-control-allow-origin").is_none(), "no CORS: {page:?}");

    // A tunnel to the API itself is refused, through the API with the right token.
    let body = format!(r#"{{"name":"self","proto":"tcp","addr":"127.0.0.1:{}"}}"#, api.port());
    let got = curl(
        "POST",
        &format!("{base}/api/tunnels"),
        &[&auth, "Content-Type: application/json"],
        Some(&body),
    )
    .await;
    assert_eq!(got.status, 422, "{got:?}");
    assert!(got.body.contains("own local API"), "{got:?}");
}

/// The relay's API: foreign Host 421, foreign Origin 403, non-JSON bodies 415, `/metrics`
/// only with the admin token or the metrics token (which opens nothing else), and the dashboard
/// under the security headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_api_refuses_web_pages_and_guards_metrics() {
    let relay = Relay::start(RelayOpts::default().args(&[
        "--metrics-token",
        "prometheus-scrape-token",
        "--api-host",
        "relay.example.test",
    ]))
    .await;
    let base = format!("http://{}", relay.api_addr);
    let admin = bearer(ADMIN_TOKEN);
    let got =
        curl("GET", &format!("{base}/api/v1/agents"), &[&admin, "Host: evil.example"], None).await;
    assert_eq!(got.status, 421, "{got:?}");
    // A name given with --api-host is answered.
    let got = curl(
        "GET",
        &format!("{base}/api/v1/agents"),
        &[&admin, "Host: relay.example.test:7400"],
        None,
    )
    .await;
    assert_eq!(got.status, 200, "{got:?}");
    let got = curl(
        "POST",
        &format!("{base}/api/v1/tokens"),
        &[&admin, "Origin: https://evil.example", "Content-Type: application/json"],
        Some(r#"{"name":"pwn"}"#),
    )
    .await;
    assert_eq!(got.status, 403, "{got:?}");
    let got = curl(
        "POST",
        &format!("{base}/api/v1/tokens"),
        &[&admin, "Content-Type: text/plain"],
        Some(r#"{"name":"pwn"}"#),
    )
    .await;
    assert_eq!(got.status, 415, "{got:?}");
    let got = curl("GET", &format!("{base}/api/v1/tokens"), &[&admin], None).await;
    assert!(!got.body.contains("pwn"), "a refused request created a token: {got:?}");

    let got = curl("GET", &format!("{base}/metrics"), &[], None).await;
    assert_eq!(got.status, 401, "{got:?}");
    let got = curl("GET", &format!("{base}/metrics"), &[&bearer("wrong")], None).await;
    assert_eq!(got.status, 401, "{got:?}");
    for token in [ADMIN_TOKEN, "prometheus-scrape-token"] {
        let got = curl("GET", &format!("{base}/metrics"), &[&bearer(token)], None).await;
        assert_eq!(got.status, 200, "{got:?}");
        assert!(got.body.contains("warren_sessions"), "{got:?}");
    }
    let got =
        curl("GET", &format!("{base}/api/v1/agents"), &[&bearer("prometheus-scrape-token")], None)
            .await;
    assert_eq!(got.status, 401, "the metrics token opens nothing else: {got:?}");
    let page = curl("GET", &format!("{base}/"), &[], None).await;
    assert_eq!(page.status, 200);
    assert!(
        page.header("content-security-policy")
            .unwrap_or_default()
            .contains("frame-ancestors 'none'"),
        "{page:?}"
    );
}

/// `warren ls` with no flags finds the running agent through `CONFIG_DIR/agent.json` and its
/// token file, even when another process took the API port first (the agent moved to the next
/// one): the squatter receives nothing. When the agent stops, it leaves the list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_finds_the_agent_and_never_calls_a_squatter() {
    let tmp = TempDir::new("sec-squat");
    let relay = Relay::start(RelayOpts::default()).await;
    let backend = HttpBackend::start().await;
    // The squatter: a listener on the port the agent asks for, counting what it is sent.
    let squatter = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let squat = squatter.local_addr().expect("addr");
    let received = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = received.clone();
    let squatting = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        while let Ok((mut s, _)) = squatter.accept().await {
            let mut buf = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or(0);
            seen.fetch_add(n.max(1), std::sync::atomic::Ordering::SeqCst);
        }
    });
    let dir = tmp.dir("config");
    let dir_s = dir.display().to_string();
    let mut args: Vec<String> = ["http", &backend.port().to_string(), "--name", "web"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    args.extend(relay.agent_args());
    // No token from the environment: the agent makes its own in the config dir.
    let mut agent = Agent::spawn_with_env(
        "squatted",
        args,
        &[
            ("WARREN_API", &squat.to_string()),
            ("WARREN_API_TOKEN", ""),
            ("WARREN_CONFIG_DIR", &dir_s),
        ],
    );
    let url = agent.http_url().await;
    let api = agent.api_addr().await;
    assert_ne!(api, squat, "the agent cannot have the squatted port");

    // The token and the list of agents are private.
    let mode = |p: &std::path::Path| {
        std::fs::metadata(p).map(|m| m.permissions().mode() & 0o777).unwrap_or(0)
    };
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("api-token")), 0o600);
    assert_eq!(mode(&dir.join("agent.json")), 0o600);
    let listed: Value =
        serde_json::from_slice(&std::fs::read(dir.join("agent.json")).expect("agent.json"))
            .expect("agent.json is JSON");
    assert_eq!(listed["agents"][0]["api"], api.to_string(), "{listed}");
    assert_eq!(listed["agents"][0]["pid"], agent.pid().expect("pid"), "{listed}");

    // No flags, no environment but the config dir: the CLI finds the agent and its token.
    let (code, out, err) = cli(&["ls"], &[("WARREN_CONFIG_DIR", &dir_s)]).await;
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("web") && out.contains(&url.url), "{out}");
    let (code, out, err) = cli(&["requests"], &[("WARREN_CONFIG_DIR", &dir_s)]).await;
    assert_eq!(code, Some(0), "{out}\n{err}");
    // A wrong token given on purpose is refused, and says which token was sent.
    let (code, _, err) =
        cli(&["ls", "--api-token", "wrong-token-wrong"], &[("WARREN_CONFIG_DIR", &dir_s)]).await;
    assert_ne!(code, Some(0));
    assert!(err.contains("401") && err.contains("--api-token"), "{err}");
    assert_eq!(
        received.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the squatter on {squat} received a call"
    );

    // Stopped, the agent leaves the list; the CLI says there is none instead of guessing.
    if let Some(pid) = agent.pid() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    agent.wait_exit(IO_TIMEOUT).await;
    let (code, _, err) = cli(&["ls"], &[("WARREN_CONFIG_DIR", &dir_s)]).await;
    assert_ne!(code, Some(0));
    assert!(err.contains("no running agent"), "{err}");
    assert_eq!(received.load(std::sync::atomic::Ordering::SeqCst), 0);
    squatting.abort();
}

/// An `--api` others can reach needs a token given on purpose.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_off_loopback_needs_a_token() {
    let tmp = TempDir::new("sec-wide-api");
    let relay = Relay::start(RelayOpts::default()).await;
    let mut args: Vec<String> = vec!["http".into(), "8080".into()];
    args.extend(relay.agent_args());
    let dir = tmp.dir("config").display().to_string();
    let mut agent = Agent::spawn_with_env(
        "wide",
        args,
        &[("WARREN_API", "0.0.0.0:0"), ("WARREN_API_TOKEN", ""), ("WARREN_CONFIG_DIR", &dir)],
    );
    let err = agent.expect_failure(IO_TIMEOUT).await;
    assert!(err.contains("--api-token") && err.contains("not a loopback address"), "{err}");
}

/// A forward from the relay's API is served only by an agent started with `--allow-forward`
/// covering its target; others refuse it and the API answers 422 with the reason. A forward
/// to the agent's own API is refused even when a rule covers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_need_the_agents_consent() {
    let tmp = TempDir::new("sec-forwards");
    let relay = Relay::start(RelayOpts::default()).await;
    let backend = HttpBackend::start().await;
    let spawn = |label: &str, extra: &[&str]| {
        let mut args: Vec<String> = ["agent", "--agent-id", label, "--config-dir"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        args.push(tmp.dir(label).display().to_string());
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        relay.spawn_agent(label, args)
    };
    let _plain = spawn("plain", &[]);
    let mut consenting = spawn("consenting", &["--allow-forward", "127.0.0.0/8"]);
    let consenting_api = consenting.api_addr().await;
    let admin = bearer(ADMIN_TOKEN);
    let api = format!("http://{}", relay.api_addr);
    eventually(IO_TIMEOUT, || {
        let (api, admin) = (api.clone(), admin.clone());
        async move {
            let got = curl("GET", &format!("{api}/api/v1/agents"), &[&admin], None).await;
            let n = got.json()["agents"].as_array().map_or(0, Vec::len);
            anyhow::ensure!(n == 2, "{n} agents connected");
            Ok(())
        }
    })
    .await;
    let forward = |agent: &str, target: String| {
        let (api, admin) = (api.clone(), admin.clone());
        let body = format!(r#"{{"agent":"{agent}","proto":"tcp","target":"{target}"}}"#);
        async move {
            curl(
                "POST",
                &format!("{api}/api/v1/forwards"),
                &[&admin, "Content-Type: application/json"],
                Some(&body),
            )
            .await
        }
    };

    let got = forward("plain", backend.port().to_string()).await;
    assert_eq!(got.status, 422, "{got:?}");
    assert!(got.body.contains("--allow-forward"), "{got:?}");
    let got = forward("consenting", format!("127.0.0.1:{}", consenting_api.port())).await;
    assert_eq!(got.status, 422, "the agent's own API: {got:?}");
    assert!(got.body.contains("own local API"), "{got:?}");
    let got = forward("consenting", "10.0.0.1:80".into()).await;
    assert_eq!(got.status, 422, "outside the rule: {got:?}");

    let got = forward("consenting", backend.port().to_string()).await;
    assert_eq!(got.status, 201, "{got:?}");
    let url = got.json()["url"].as_str().expect("url").to_owned();
    let port: u16 = url.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port");
    let public = SocketAddr::from(([127, 0, 0, 1], port));
    within(IO_TIMEOUT, "GET", expect_get(public, "localhost", &backend.greeting()))
        .await
        .expect("the consented forward serves");
    // Only refused forwards left no record behind.
    let got = curl("GET", &format!("{api}/api/v1/forwards"), &[&admin], None).await;
    assert_eq!(got.json()["forwards"].as_array().map_or(0, Vec::len), 1, "{got:?}");
}

/// Wrong tokens: ten a minute cost nothing; past that the address is locked out for a while,
/// during which even the right token gets 429 with Retry-After; afterwards it works again. On
/// the relay's API and on the agent's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_authentications_are_slowed_down() {
    let tmp = TempDir::new("sec-throttle");
    let relay = Relay::start(RelayOpts::default()).await;
    let backend = HttpBackend::start().await;
    let mut agent = relay.spawn_tunnel(&tmp, "http", "web", backend.port(), &[]);
    agent.http_url().await;
    let agent_api = agent.api_addr().await;
    for (base, good, path) in [
        (format!("http://{}", relay.api_addr), ADMIN_TOKEN, "/api/v1/agents"),
        (format!("http://{agent_api}"), AGENT_API_TOKEN, "/api/tunnels"),
    ] {
        let url = format!("{base}{path}");
        for i in 0..11 {
            let got = curl("GET", &url, &[&bearer(&format!("guess-{i}"))], None).await;
            assert_eq!(got.status, 401, "guess {i}: {got:?}");
        }
        let got = curl("GET", &url, &[&bearer(good)], None).await;
        assert_eq!(got.status, 429, "locked out, whatever the token: {got:?}");
        let wait: u64 =
            got.header("retry-after").and_then(|v| v.parse().ok()).expect("Retry-After");
        assert!((1..=30).contains(&wait), "{got:?}");
        tokio::time::sleep(Duration::from_secs(wait)).await;
        let got = curl("GET", &url, &[&bearer(good)], None).await;
        assert_eq!(got.status, 200, "after the lockout: {got:?}");
    }
}
