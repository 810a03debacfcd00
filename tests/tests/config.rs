//! `warren start --config FILE`, flag and environment overrides, and broken config files.

use std::path::Path;

use warren_tests::{
    Agent, EchoBackend, HttpBackend, HttpUrl, IO_TIMEOUT, READY_TIMEOUT, Relay, RelayOpts, TcpUrl,
    TempDir, UdpUrl, expect_get, http_get, tcp_echo, unique, within,
};

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// `warren start --config FILE` with the relay's flags, its identity in a per-test config dir.
fn start_with_relay_flags(relay: &Relay, label: &str, file: &Path, tmp: &TempDir) -> Agent {
    let mut args = vec!["start".to_owned(), "--config".into(), path_str(file)];
    args.extend(relay.agent_args());
    Agent::spawn_with_env(label, args, &[("WARREN_CONFIG_DIR", &path_str(&tmp.dir("config-dir")))])
}

/// `warren start` with everything in the file, including a second relay token, a fixed
/// subdomain and a fixed remote port; URLs come out in file order ("web" before "db", which is
/// not alphabetical) and both tunnels work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_with_everything_in_the_file() {
    let tmp = TempDir::new("config-full");
    let relay = Relay::start(RelayOpts::default().tokens(&["token-one", "token-two"])).await;
    let backend = HttpBackend::start().await;
    let echo = EchoBackend::start().await;
    let sub = unique("cfg-web");
    let remote_port = relay.ports().low + 5;
    let config = format!(
        r#"relay = "{relay}"
token = "token-two"
relay_ca = "{ca}"
transport = "tcp"
agent_id = "{agent_id}"

[tunnels.web]
proto = "http"
target = "{http_port}"
subdomain = "{sub}"

[tunnels.db]
proto = "tcp"
target = "127.0.0.1:{echo_port}"
remote_port = {remote_port}
"#,
        relay = relay.relay_arg(),
        ca = path_str(&relay.ca_path),
        agent_id = unique("cfg-agent"),
        http_port = backend.port(),
        echo_port = echo.port(),
    );
    let file = tmp.write("warren.toml", &config);
    let mut agent = Agent::spawn_with_env(
        "start",
        ["start".to_owned(), "--config".into(), path_str(&file)],
        &[("WARREN_CONFIG_DIR", &path_str(&tmp.dir("config-dir")))],
    );
    let urls = agent.urls(2).await;
    assert_eq!(urls[0], format!("http://{sub}.localhost:{}", relay.http_addr.port()));
    assert_eq!(urls[1], format!("tcp://localhost:{remote_port}"));
    expect_get(relay.http_addr, &format!("{sub}.localhost"), &backend.greeting())
        .await
        .expect("http tunnel from the config file");
    tcp_echo(warren_tests::localhost(remote_port), 4096).await.expect("tcp tunnel from the file");
}

/// `--relay`, `--token` and `--relay-ca` override (or add to) what the file says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_flags_override_the_file() {
    let tmp = TempDir::new("config-override");
    let relay = Relay::start_default().await;
    let backend = HttpBackend::start().await;
    let echo = EchoBackend::start().await;
    let config = format!(
        r#"relay = "127.0.0.1:9"
token = "not-the-token"

[tunnels.api]
proto = "http"
target = "127.0.0.1:{http_port}"

[tunnels.echo]
proto = "tcp"
target = "{echo_port}"
"#,
        http_port = backend.port(),
        echo_port = echo.port(),
    );
    let file = tmp.write("warren.toml", &config);
    let mut agent = start_with_relay_flags(&relay, "start", &file, &tmp);
    let urls = agent.urls(2).await;
    let http = HttpUrl::parse(&urls[0]).expect("first URL is the http tunnel");
    let tcp = TcpUrl::parse(&urls[1]).expect("second URL is the tcp tunnel");
    assert!(relay.ports().contains(tcp.port), "{tcp} outside the pool");
    expect_get(relay.http_addr, &http.host(), &backend.greeting()).await.expect("http tunnel");
    tcp_echo(tcp.addr(), 4096).await.expect("tcp tunnel");
}

/// WARREN_RELAY, WARREN_TOKEN, WARREN_AGENT_ID and WARREN_CONFIG_DIR configure `warren http`;
/// the same WARREN_AGENT_ID after a restart gives the same URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_variables_configure_the_agent() {
    let tmp = TempDir::new("config-env");
    let relay = Relay::start_default().await;
    let backend = HttpBackend::start().await;
    let agent_id = unique("env-agent");
    let config_dir = path_str(&tmp.dir("config-dir"));
    let relay_arg = relay.relay_arg();
    let env = [
        ("WARREN_RELAY", relay_arg.as_str()),
        ("WARREN_TOKEN", relay.token()),
        ("WARREN_AGENT_ID", agent_id.as_str()),
        ("WARREN_CONFIG_DIR", config_dir.as_str()),
    ];
    let args = [
        "http".to_owned(),
        backend.port().to_string(),
        "--relay-ca".into(),
        path_str(&relay.ca_path),
    ];
    let mut first = Agent::spawn_with_env("env-1", args.clone(), &env);
    let url = first.http_url().await;
    expect_get(relay.http_addr, &url.host(), &backend.greeting()).await.expect("env-configured");
    first.kill().await;

    let mut second = Agent::spawn_with_env("env-2", args, &env);
    assert_eq!(second.http_url().await, url, "same WARREN_AGENT_ID, same URL");
    expect_get(relay.http_addr, &url.host(), &backend.greeting()).await.expect("after restart");
}

/// Runs `warren start --config FILE` and expects a failure; returns stderr.
async fn start_fails(tmp: &TempDir, file: &Path) -> String {
    let mut agent = Agent::spawn_with_env(
        "start",
        ["start".to_owned(), "--config".into(), path_str(file)],
        &[("WARREN_CONFIG_DIR", &path_str(&tmp.dir("config-dir")))],
    );
    let stderr = agent.expect_failure(READY_TIMEOUT).await;
    assert!(agent.stdout().is_empty(), "no URL may be printed: {:?}", agent.stdout());
    stderr
}

/// A TOML syntax error is reported with its line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_syntax_error_names_the_line() {
    let tmp = TempDir::new("config-syntax");
    let file = tmp.write(
        "warren.toml",
        "relay = \"127.0.0.1:9\"\ntoken = \"x\"\n[tunnels.web\nproto = \"http\"\ntarget = \"8080\"\n",
    );
    let stderr = start_fails(&tmp, &file).await;
    assert!(stderr.contains("line 3"), "stderr should point at line 3:\n{stderr}");
}

/// Two bad tunnels: both problems are reported, each with its line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_reports_every_problem_with_its_line() {
    let tmp = TempDir::new("config-problems");
    let text = [
        r#"relay = "127.0.0.1:9""#,  // 1
        r#"token = "x""#,            // 2
        "",                          // 3
        "[tunnels.a]",               // 4
        r#"proto = "http""#,         // 5
        r#"target = "8080""#,        // 6
        r#"colour = "red""#,         // 7: unknown key
        "",                          // 8
        "[tunnels.b]",               // 9
        r#"proto = "http""#,         // 10
        r#"target = "8081""#,        // 11
        r#"subdomain = "bad_name""#, // 12: invalid subdomain
        "",
    ]
    .join("\n");
    let file = tmp.write("warren.toml", &text);
    let stderr = start_fails(&tmp, &file).await;
    assert!(stderr.contains("line 7"), "the unknown key on line 7 is not reported:\n{stderr}");
    assert!(stderr.contains("colour"), "the unknown key is not named:\n{stderr}");
    assert!(stderr.contains("line 12"), "the bad subdomain on line 12 is not reported:\n{stderr}");
    assert!(stderr.contains("bad_name"), "the bad subdomain is not named:\n{stderr}");
}

/// A config file that does not exist: a clear error naming the path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_file_missing_names_the_path() {
    let tmp = TempDir::new("config-missing");
    let file = tmp.join("no-such-warren.toml");
    let stderr = start_fails(&tmp, &file).await;
    assert!(stderr.contains(&path_str(&file)), "stderr should name {}:\n{stderr}", file.display());
}

/// The example shipped in client/examples/warren.toml is a valid config: with the relay, token
/// and CA given as flags it binds its tunnels (`web` on subdomain `shop`, `db`, `secure` and
/// `dns`), options included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_config_binds_its_tunnels() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../client/examples/warren.toml");
    assert!(example.is_file(), "{} is missing", example.display());
    let tmp = TempDir::new("config-example");
    let relay = Relay::start_default().await;
    let mut agent = start_with_relay_flags(&relay, "example", &example, &tmp);
    let urls = agent.urls(4).await;
    assert_eq!(urls[0], format!("http://shop.localhost:{}", relay.http_addr.port()));
    let tcp = TcpUrl::parse(&urls[1]).expect("second URL is the db tunnel");
    assert!(relay.ports().contains(tcp.port), "{tcp} outside the pool");
    assert_eq!(urls[2], format!("tls://secure.localhost:{}", relay.https_addr.port()));
    let udp = UdpUrl::parse(&urls[3]).expect("fourth URL is the dns tunnel");
    assert!(relay.ports().contains(udp.port), "{udp:?} outside the pool");
    // The web tunnel's options hold at the relay: no credentials, no entry.
    let resp = within(
        IO_TIMEOUT,
        "GET without credentials",
        http_get(relay.http_addr, &format!("shop.localhost:{}", relay.http_addr.port()), "/"),
    )
    .await
    .expect("GET");
    assert_eq!(resp.status, http::StatusCode::UNAUTHORIZED, "{}", resp.text());
}
