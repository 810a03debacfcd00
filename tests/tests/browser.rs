//! The dashboards in a real headless Chromium, driven over WebDriver (chromedriver): the agent's
//! live inspector with replay, and the relay's log-in, forward creation and tunnel list.
//! Screenshots of each page are kept under `target/screenshots/`.

use std::path::PathBuf;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use warren_tests::{
    ADMIN_TOKEN, Agent, Daemon, HttpBackend, IO_TIMEOUT, Relay, RelayOpts, TempDir, closed_port,
    expect_get, http_get, within,
};

/// How long a page may take to show what is expected.
const UI_TIMEOUT: Duration = Duration::from_secs(20);

/// A headless Chromium behind its own chromedriver; both end with the test.
struct Browser {
    client: Client,
    _driver: Daemon,
}

impl Browser {
    async fn start(tmp: &TempDir) -> Self {
        let port = closed_port();
        let driver = Daemon::spawn(
            "chromedriver",
            "chromedriver",
            &[format!("--port={port}"), "--allowed-ips=127.0.0.1".into()],
            &[],
        );
        let profile = tmp.dir("chromium-profile");
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-background-networking", "--no-first-run", "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.display()),
                ],
            }),
        );
        let mut builder =
            ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new());
        builder.capabilities(caps);
        let url = format!("http://127.0.0.1:{port}");
        let deadline = tokio::time::Instant::now() + UI_TIMEOUT;
        let client = loop {
            match builder.connect(&url).await {
                Ok(c) => break c,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("no WebDriver session at {url}: {e}\n{}", driver.output()),
            }
        };
        Self { client, _driver: driver }
    }

    /// Waits until the element at `css` shows `text`.
    async fn wait_text(&self, css: &str, text: &str) -> String {
        let deadline = tokio::time::Instant::now() + UI_TIMEOUT;
        let mut last = String::new();
        loop {
            if let Ok(e) = self.client.find(Locator::Css(css)).await {
                last = e.text().await.unwrap_or_default();
                if last.contains(text) {
                    return last;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{css} never showed {text:?}; last it showed {last:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn click(&self, css: &str) {
        self.client
            .wait()
            .at_most(UI_TIMEOUT)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css}: {e}"))
            .click()
            .await
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    async fn type_into(&self, css: &str, text: &str) {
        let e = self
            .client
            .wait()
            .at_most(UI_TIMEOUT)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css}: {e}"));
        e.clear().await.unwrap_or_else(|e| panic!("clear {css}: {e}"));
        e.send_keys(text).await.unwrap_or_else(|e| panic!("type into {css}: {e}"));
    }

    /// Saves a screenshot as `target/screenshots/NAME.png`.
    async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.client.screenshot().await.expect("screenshot");
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/screenshots");
        std::fs::create_dir_all(&dir).expect("screenshot dir");
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).expect("write screenshot");
        eprintln!("screenshot: {}", path.display());
        path
    }
}

/// The agent dashboard: a request sent through the tunnel appears live (no reload), its detail
/// shows its headers, and a replay shows the replay's response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_dashboard_shows_and_replays_requests_live() {
    let tmp = TempDir::new("browser-agent");
    let relay = Relay::start(RelayOpts::default()).await;
    let backend = HttpBackend::start().await;
    let mut agent = relay.spawn_tunnel(&tmp, "http", "shop", backend.port(), &[]);
    let url = agent.http_url().await;
    let api = agent.api_addr().await;
    let browser = Browser::start(&tmp).await;
    // Without the token the dashboard asks for it and shows nothing of the agent.
    browser.client.goto(&format!("http://{api}/")).await.expect("open the dashboard");
    browser.wait_text("#login", "Log in").await;
    // The login URL the agent logs: the token is kept in the tab and leaves the address bar.
    let token = warren_tests::AGENT_API_TOKEN;
    browser.client.goto(&format!("http://{api}/#token={token}")).await.expect("open the login URL");
    browser.wait_text("#tunnels", &url.url).await;
    let shown = browser.client.current_url().await.expect("the address");
    assert!(!shown.as_str().contains(token), "the token stays in the address bar: {shown}");
    browser.wait_text("#live", "(live)").await;

    let resp =
        within(IO_TIMEOUT, "GET", http_get(url.addr(), &url.host(), "/headers?from=browser"))
            .await
            .expect("GET through the tunnel");
    assert_eq!(resp.status, http::StatusCode::OK);
    browser.wait_text("#requests", "/headers?from=browser").await;
    browser.click("#requests tr.row").await;
    browser.wait_text("#detail", "x-forwarded-for").await;
    browser.screenshot("agent-dashboard").await;
    browser.click("#replay").await;
    let shown = browser.wait_text("#replay-result", "Replayed as").await;
    assert!(shown.contains("200"), "{shown}");
    // The replay is itself a new row, marked as such.
    browser.wait_text("#requests", "(replay)").await;
    browser.screenshot("agent-dashboard-replayed").await;
    browser.client.close().await.expect("close the browser");
    agent.assert_running();
}

/// The relay dashboard: log in with the admin token, see the connected agent, create a forward
/// to it, and see the new tunnel listed; the forward serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_dashboard_logs_in_and_creates_a_forward() {
    let tmp = TempDir::new("browser-relay");
    let relay = Relay::start(RelayOpts::default()).await;
    let backend = HttpBackend::start().await;
    let mut agent = Agent::spawn(
        "dash-laptop",
        [
            "agent".to_owned(),
            "--agent-id".into(),
            "laptop".into(),
            "--allow-forward".into(),
            "127.0.0.1/32".into(),
            "--config-dir".into(),
            tmp.dir("agent").display().to_string(),
        ]
        .into_iter()
        .chain(relay.agent_args()),
    );
    let browser = Browser::start(&tmp).await;
    browser.client.goto(&format!("http://{}/", relay.api_addr)).await.expect("open the dashboard");
    // A wrong token is refused with the API's reason.
    browser.type_into("#token", "wrong").await;
    browser.click("#login-button").await;
    browser.wait_text("#login-error", "not accepted").await;
    browser.type_into("#token", ADMIN_TOKEN).await;
    browser.click("#login-button").await;
    browser.wait_text("#agents", "laptop").await;

    browser.type_into("#f-agent", "laptop").await;
    browser.type_into("#f-target", &backend.port().to_string()).await;
    browser.type_into("#f-sub", "dash").await;
    browser.click("#f-create").await;
    let created = browser.wait_text("#forward-result", "at http://dash.localhost").await;
    browser.wait_text("#tunnels", "fwd-").await;
    browser.wait_text("#forwards", "laptop").await;
    browser.screenshot("relay-dashboard").await;
    let host = format!("dash.localhost:{}", relay.http_addr.port());
    within(IO_TIMEOUT, "GET", expect_get(relay.http_addr, &host, &backend.greeting()))
        .await
        .unwrap_or_else(|e| {
            panic!("the forward created in the browser ({created}) does not serve: {e:#}")
        });
    browser.client.close().await.expect("close the browser");
    agent.assert_running();
}

/// The agent dashboard's networks: a network with an endpoint, a published port and a service
/// shows up, and a detached endpoint disappears without a reload. The agent manages networks
/// inside a namespace of its own; the WebDriver, the browser and this test's sockets enter it
/// too (a thread that joined the namespace starts them).
#[test]
fn agent_dashboard_shows_networks() {
    use warren_tests::netns::{HostNs, HostOpts, Netns};
    let Some(host) = HostNs::start(HostOpts::default()) else { return };
    host.net_ok(&["create", "web", "--subnet", "10.213.5.0/24"]);
    let a_ns = Netns::new("a");
    host.attach("web", &a_ns, "api", &["--alias", "backend"]);
    let b_ns = Netns::new("b");
    host.attach("web", &b_ns, "worker", &[]);
    host.net_ok(&["publish", "web", "api", "8080:80"]);
    host.net_ok(&[
        "service",
        "create",
        "web",
        "shop",
        "--mode",
        "dnsrr",
        "--endpoints",
        "api,worker",
    ]);
    let ns_path = host.h.path();
    let token = warren_tests::AGENT_API_TOKEN;
    let tmp = TempDir::new("browser-networks");
    let detach = || host.net_ok(&["detach", "web", "worker"]);
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let ui = scope.spawn(move || {
            let f = std::fs::File::open(&ns_path).expect("open the namespace");
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("enter it");
            let rt =
                tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
            rt.block_on(async {
                let browser = Browser::start(&tmp).await;
                let login = format!("http://127.0.0.1:4040/#token={token}");
                browser.client.goto(&login).await.expect("open the dashboard");
                let shown = browser.wait_text("#networks", "10.213.5.0/24").await;
                for needle in ["web", "api", "backend", "worker", "*:8080/tcp", "shop", "dnsrr"] {
                    assert!(shown.contains(needle), "the networks table lacks {needle:?}: {shown}");
                }
                browser.screenshot("agent-dashboard-networks").await;
                tx.send(()).expect("ask for the detach");
                let deadline = tokio::time::Instant::now() + UI_TIMEOUT;
                loop {
                    let now = browser.wait_text("#networks", "api").await;
                    if !now.contains("worker") {
                        break;
                    }
                    assert!(tokio::time::Instant::now() < deadline, "worker still shown: {now}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                browser.client.close().await.expect("close the browser");
            });
        });
        if rx.recv_timeout(Duration::from_secs(90)).is_ok() {
            detach();
        }
        ui.join().expect("the browser thread");
    });
}
