//! The relay's HTTPS listener: TLS termination with the development CA and with certificates
//! from `--cert-dir` (reloaded when they change), HTTP/2 over TLS and h2c, gRPC streaming to an
//! h2c upstream, WebSocket over TLS, `--https-only` redirects, and `warren tls` SNI passthrough
//! where the relay never decrypts.
//!
//! Certificates other than the relay's own are made with the `openssl` command-line tool; the
//! tests that need them skip (saying so) when it is missing. `curl` is required.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use http::{StatusCode, Version, header};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncBufReadExt as _, AsyncRead, AsyncWrite, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::AbortOnDropHandle;
use warren_tests::client::websocket_echo_on;
use warren_tests::grpc::alpn_protocol;
use warren_tests::{
    Agent, GrpcEchoBackend, HttpBackend, HttpSetup, IO_TIMEOUT, Pki, Relay, RelayOpts, TempDir,
    Transport, eventually, grpc_ping_pong, h2_get, http_get, parse_headers, peer_leaf,
    random_bytes, tls_connect, tls_connect_any_cert, within,
};

warren_tests::each_transport!(
    https_with_dev_ca,
    http2_over_tls_and_h2c,
    grpc_streaming_over_tls_and_h2c,
    websocket_over_https,
    tls_passthrough_by_sni,
);

/// How long a replaced certificate file may take to be served: the relay polls its cert dir
/// every 2 s; the rest is slack for a slow machine.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// `warren ARGS... --transport t --config-dir TMP/agent-LABEL ...` against `relay`.
fn spawn_agent(relay: &Relay, tmp: &TempDir, label: &str, t: Transport, args: &[&str]) -> Agent {
    let mut all: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    all.extend([
        "--transport".to_owned(),
        t.as_str().to_owned(),
        "--config-dir".to_owned(),
        tmp.dir(&format!("agent-{label}")).display().to_string(),
    ]);
    relay.spawn_agent(label, all)
}

/// The subdomain label of an `http://NAME.localhost:PORT` (or `https://`) URL.
fn subdomain_of(url: &str) -> String {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .unwrap_or_else(|| panic!("{url:?} is not an http(s) URL"));
    let host = rest.split(':').next().unwrap_or(rest);
    host.strip_suffix(".localhost")
        .unwrap_or_else(|| panic!("{url:?} is not under localhost"))
        .to_owned()
}

/// Values of header `name` in a `/headers` answer of [`HttpBackend`]; exactly one is expected.
fn one_header(headers_text: &str, name: &str) -> String {
    let values: Vec<String> = parse_headers(headers_text)
        .into_iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v)
        .collect();
    assert_eq!(
        values.len(),
        1,
        "backend saw {name} {values:?}; all request headers it saw:\n{headers_text}"
    );
    values[0].clone()
}

/// What `curl` answered: the body and `%{http_version}` (`2`, `1.1`).
#[derive(Debug)]
struct CurlOut {
    body: String,
    version: String,
}

/// `curl --cacert CA --resolve HOST:PORT:127.0.0.1 https://HOST:PORT/PATH EXTRA...`; fails if
/// curl fails (TLS verification included) or the status is not 200.
async fn curl(
    ca: &Path,
    host: &str,
    port: u16,
    path: &str,
    extra: &[&str],
) -> anyhow::Result<CurlOut> {
    const SEP: &str = "\n--curl-http-version--";
    let url = format!("https://{host}:{port}{path}");
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args(["-sS", "--fail", "--noproxy", "*", "--max-time", "20"])
        .arg("--cacert")
        .arg(ca)
        .arg("--resolve")
        .arg(format!("{host}:{port}:127.0.0.1"))
        .args(["-w", &format!("{SEP}%{{http_version}}")])
        .args(extra)
        .arg(&url)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = match tokio::time::timeout(IO_TIMEOUT, cmd.output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("`curl` is not installed; these tests need it (the test script installs it)")
        }
        Ok(Err(e)) => return Err(e).context("run curl"),
        Err(_) => bail!("curl {url} did not finish within {IO_TIMEOUT:?}"),
    };
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "curl {extra:?} {url} failed with {}: stderr {:?}, stdout {stdout:?}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let (body, version) = stdout
        .rsplit_once(SEP)
        .with_context(|| format!("curl output without the version marker: {stdout:?}"))?;
    Ok(CurlOut { body: body.to_owned(), version: version.trim().to_owned() })
}

/// The DER of the first certificate in a PEM file.
fn leaf_der(pem: &Path) -> Vec<u8> {
    CertificateDer::pem_file_iter(pem)
        .unwrap_or_else(|e| panic!("read {}: {e}", pem.display()))
        .next()
        .unwrap_or_else(|| panic!("no certificate in {}", pem.display()))
        .unwrap_or_else(|e| panic!("parse {}: {e}", pem.display()))
        .to_vec()
}

/// Puts `src` at `dst` atomically (copy to a hidden file in the same directory, then rename),
/// so the relay's cert-dir watcher never reads a half-written file.
fn install(src: &Path, dst: &Path) {
    let name = dst.file_name().expect("file name").to_string_lossy().into_owned();
    let tmp = dst.with_file_name(format!(".{name}.tmp"));
    std::fs::copy(src, &tmp).unwrap_or_else(|e| panic!("copy to {}: {e}", tmp.display()));
    std::fs::rename(&tmp, dst).unwrap_or_else(|e| panic!("rename to {}: {e}", dst.display()));
}

/// A TLS server on 127.0.0.1 with its own certificate: for each line a client sends it answers
/// `SNI|LINE` (SNI as the client sent it, `-` if none). No ALPN. Stops on drop.
#[derive(Debug)]
struct TlsLineBackend {
    port: u16,
    _task: AbortOnDropHandle<()>,
}

impl TlsLineBackend {
    async fn start(cert: &Path, key: &Path) -> Self {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .expect("read backend cert")
            .collect::<Result<_, _>>()
            .expect("parse backend cert");
        let key = PrivateKeyDer::from_pem_file(key).expect("read backend key");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("backend certificate");
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind tls backend");
        let port = listener.local_addr().expect("tls backend addr").port();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((tcp, _)) = accepted else { continue };
                        let acceptor = acceptor.clone();
                        conns.spawn(async move {
                            let Ok(tls) = acceptor.accept(tcp).await else { return };
                            let sni = tls.get_ref().1.server_name().unwrap_or("-").to_owned();
                            let (r, mut w) = tokio::io::split(tls);
                            let mut lines = BufReader::new(r).lines();
                            while let Ok(Some(line)) = lines.next_line().await {
                                if w.write_all(format!("{sni}|{line}\n").as_bytes()).await.is_err()
                                    || w.flush().await.is_err()
                                {
                                    return;
                                }
                            }
                            let _ = w.shutdown().await;
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Self { port, _task: AbortOnDropHandle::new(task) }
    }
}

/// Sends each line and checks the [`TlsLineBackend`] answer `SNI|LINE` for it.
async fn line_round_trips<S>(stream: S, sni: &str, lines: &[String]) -> anyhow::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (r, mut w) = tokio::io::split(stream);
    let mut reader = BufReader::new(r);
    for (i, line) in lines.iter().enumerate() {
        w.write_all(format!("{line}\n").as_bytes())
            .await
            .with_context(|| format!("write line {i}"))?;
        w.flush().await.context("flush")?;
        let mut answer = String::new();
        let n = tokio::time::timeout(IO_TIMEOUT, reader.read_line(&mut answer))
            .await
            .with_context(|| format!("no answer to line {i} in time"))?
            .with_context(|| format!("read answer to line {i}"))?;
        ensure!(n > 0, "connection closed before the answer to line {i}");
        let want = format!("{sni}|{line}\n");
        ensure!(
            answer == want,
            "answer to line {i} ({} bytes sent): got {:?}…, want {:?}…",
            line.len(),
            answer.chars().take(80).collect::<String>(),
            want.chars().take(80).collect::<String>()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// A real client (`curl`, trusting only the relay's dev CA) reaches an HTTP tunnel on the
/// HTTPS listener with a certificate issued on demand for `NAME.localhost`, over HTTP/2 (ALPN
/// h2) and HTTP/1.1; the backend sees `X-Forwarded-Proto: https` and the other forwarding
/// headers.
async fn https_with_dev_ca(t: Transport) {
    let s = HttpSetup::start(t).await;
    let host = format!("{}.localhost", s.url.subdomain);
    let port = s.relay.https_addr.port();
    let ca = s.relay.ca_path.clone();
    let greeting = s.backend.greeting();

    let h2 = curl(&ca, &host, port, "/", &[]).await.expect("curl over HTTPS (default: HTTP/2)");
    assert_eq!(h2.body, greeting, "curl over HTTPS: body");
    assert_eq!(h2.version, "2", "curl should negotiate HTTP/2 with ALPN h2 on the HTTPS listener");

    let h1 = curl(&ca, &host, port, "/", &["--http1.1"]).await.expect("curl --http1.1 over HTTPS");
    assert_eq!(h1.body, greeting, "curl --http1.1 over HTTPS: body");
    assert_eq!(h1.version, "1.1", "curl --http1.1 version");

    for (what, extra) in [("HTTP/2", &[][..]), ("HTTP/1.1", &["--http1.1"][..])] {
        let out = curl(&ca, &host, port, "/headers", extra)
            .await
            .unwrap_or_else(|e| panic!("curl /headers over {what}: {e:#}"));
        let text = out.body;
        assert_eq!(one_header(&text, "x-forwarded-proto"), "https", "over {what}");
        assert_eq!(one_header(&text, "x-forwarded-for"), "127.0.0.1", "over {what}");
        assert_eq!(one_header(&text, "x-real-ip"), "127.0.0.1", "over {what}");
        assert_eq!(one_header(&text, "x-forwarded-host"), format!("{host}:{port}"), "over {what}");
        assert_eq!(one_header(&text, "host"), format!("{host}:{port}"), "over {what}");
    }

    // The same tunnel still answers on the plain HTTP listener.
    let resp = within(IO_TIMEOUT, "GET / over HTTP", http_get(s.addr(), &s.host(), "/"))
        .await
        .expect("GET / over plain HTTP");
    assert_eq!((resp.status, resp.text()), (StatusCode::OK, greeting));
}

/// Certificates from `--cert-dir` are what visitors see for their names (exact and wildcard
/// files); other names still get dev-CA certificates; a replaced file is served within a few
/// seconds without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_given_certificate() {
    let pki = Pki::new("https-given-pki");
    pki.ca("ca1");
    pki.ca("ca2");
    let (cert1, key1) = pki.leaf("given1", "ca1", "given.localhost");
    let (wild, wild_key) = pki.leaf("wild", "ca1", "*.wild.localhost");
    let (cert2, key2) = pki.leaf("given2", "ca2", "given.localhost");
    let (ca1, ca2) = (pki.path("ca1.pem"), pki.path("ca2.pem"));

    let tmp = TempDir::new("https-given");
    let cert_dir = tmp.dir("certs");
    install(&key1, &cert_dir.join("given.localhost-key.pem"));
    install(&cert1, &cert_dir.join("given.localhost.pem"));
    install(&wild_key, &cert_dir.join("_wildcard.wild.localhost-key.pem"));
    install(&wild, &cert_dir.join("_wildcard.wild.localhost.pem"));

    let cert_dir_arg = cert_dir.display().to_string();
    let relay = Relay::start(RelayOpts::default().args(&["--cert-dir", &cert_dir_arg])).await;
    let backend = HttpBackend::start_named("given").await;
    let port = backend.port().to_string();
    let mut agent = spawn_agent(
        &relay,
        &tmp,
        "given",
        Transport::Quic,
        &["http", &port, "--subdomain", "given"],
    );
    let url = agent.url().await;
    assert_eq!(subdomain_of(&url), "given", "agent URL {url}");
    let https = relay.https_addr;
    let authority = format!("given.localhost:{}", https.port());

    // The given certificate, trusted through its own CA only.
    let tls = tls_connect(https, "given.localhost", &ca1, &[b"h2"])
        .await
        .expect("TLS to given.localhost trusting only the given CA");
    assert!(peer_leaf(&tls) == Some(leaf_der(&cert1)), "relay did not serve the given certificate");
    let (status, version, _, body) =
        h2_get(tls, "https", &authority, "/").await.expect("GET / with the given certificate");
    assert_eq!((status, version), (StatusCode::OK, Version::HTTP_2));
    assert_eq!(String::from_utf8_lossy(&body), backend.greeting());
    let err = tls_connect(https, "given.localhost", &relay.ca_path, &[b"h2"]).await;
    assert!(err.is_err(), "given.localhost must not be served a dev-CA certificate");
    let out = curl(&ca1, "given.localhost", https.port(), "/", &[])
        .await
        .expect("curl trusting only the given CA");
    assert_eq!(out.body, backend.greeting());

    // The wildcard file covers one label under its domain.
    let tls = tls_connect(https, "deep.wild.localhost", &ca1, &[])
        .await
        .expect("TLS to deep.wild.localhost with the wildcard file");
    assert!(peer_leaf(&tls) == Some(leaf_der(&wild)), "relay did not serve the wildcard file");

    // Names without a file still get certificates from the dev CA.
    tls_connect(https, "other.localhost", &relay.ca_path, &[])
        .await
        .expect("other.localhost with a dev-CA certificate");

    // Replace the files (key first): the new certificate, from another CA, is picked up.
    install(&key2, &cert_dir.join("given.localhost-key.pem"));
    install(&cert2, &cert_dir.join("given.localhost.pem"));
    let new_leaf = leaf_der(&cert2);
    let tls = eventually(RELOAD_TIMEOUT, || async {
        let tls = tls_connect(https, "given.localhost", &ca2, &[b"h2"]).await?;
        ensure!(peer_leaf(&tls) == Some(new_leaf.clone()), "still the old certificate");
        Ok(tls)
    })
    .await;
    let (status, _, _, body) =
        h2_get(tls, "https", &authority, "/").await.expect("GET / with the reloaded certificate");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(String::from_utf8_lossy(&body), backend.greeting());
    let err = tls_connect(https, "given.localhost", &ca1, &[b"h2"]).await;
    assert!(err.is_err(), "the replaced certificate (first CA) is still served");
    agent.assert_running();
}

/// HTTP/2 visitors: over TLS with ALPN h2 on the HTTPS listener, and h2c with prior knowledge
/// on the HTTP listener, both reach an HTTP/1.1 backend.
async fn http2_over_tls_and_h2c(t: Transport) {
    let s = HttpSetup::start(t).await;
    let name = format!("{}.localhost", s.url.subdomain);
    let https = s.relay.https_addr;
    let tls_authority = format!("{name}:{}", https.port());
    let greeting = s.backend.greeting();

    let tls = tls_connect(https, &name, &s.relay.ca_path, &[b"h2"]).await.expect("TLS with h2");
    assert_eq!(alpn_protocol(&tls).as_deref(), Some(&b"h2"[..]), "ALPN must select h2");
    let (status, version, _, body) =
        h2_get(tls, "https", &tls_authority, "/").await.expect("h2 GET / over TLS");
    assert_eq!((status, version), (StatusCode::OK, Version::HTTP_2), "h2 over TLS");
    assert_eq!(String::from_utf8_lossy(&body), greeting, "h2 over TLS");

    let tls = tls_connect(https, &name, &s.relay.ca_path, &[b"h2"]).await.expect("TLS with h2");
    let (status, _, _, body) =
        h2_get(tls, "https", &tls_authority, "/headers").await.expect("h2 GET /headers");
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(one_header(&text, "x-forwarded-proto"), "https", "h2 over TLS");
    assert_eq!(one_header(&text, "x-forwarded-host"), tls_authority, "h2 over TLS");
    assert_eq!(one_header(&text, "x-forwarded-for"), "127.0.0.1", "h2 over TLS");

    let tcp = TcpStream::connect(s.addr()).await.expect("connect to the HTTP listener");
    let (status, version, _, body) =
        h2_get(tcp, "http", &s.host(), "/").await.expect("h2c (prior knowledge) GET /");
    assert_eq!((status, version), (StatusCode::OK, Version::HTTP_2), "h2c");
    assert_eq!(String::from_utf8_lossy(&body), greeting, "h2c");

    let tcp = TcpStream::connect(s.addr()).await.expect("connect to the HTTP listener");
    let (status, _, _, body) =
        h2_get(tcp, "http", &s.host(), "/headers").await.expect("h2c GET /headers");
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(one_header(&text, "x-forwarded-proto"), "http", "h2c");
    assert_eq!(one_header(&text, "x-forwarded-host"), s.host(), "h2c");
}

/// gRPC bidirectional streaming through a tunnel with `--upstream-http2`: ping-pong (each
/// reply before the next message, so nothing is buffered) over TLS and over h2c; the
/// `grpc-status` trailer comes through.
async fn grpc_streaming_over_tls_and_h2c(t: Transport) {
    let tmp = TempDir::new("https-grpc");
    let relay = Relay::start_default().await;
    let backend = GrpcEchoBackend::start().await.expect("grpc backend");
    let port = backend.port().to_string();
    let mut agent = spawn_agent(&relay, &tmp, "grpc", t, &["http", &port, "--upstream-http2"]);
    let url = agent.url().await;
    let name = format!("{}.localhost", subdomain_of(&url));
    let messages: Vec<Vec<u8>> =
        (1..=5).map(|i| format!("message {i} of 5").into_bytes()).collect();
    let messages: Vec<&[u8]> = messages.iter().map(Vec::as_slice).collect();
    let expected: Vec<Vec<u8>> = messages.iter().map(|m| [&b"echo:"[..], m].concat()).collect();

    let tls =
        tls_connect(relay.https_addr, &name, &relay.ca_path, &[b"h2"]).await.expect("TLS with h2");
    let authority = format!("{name}:{}", relay.https_addr.port());
    let over_tls =
        grpc_ping_pong(tls, "https", &authority, &messages).await.expect("gRPC over TLS");
    let tcp = TcpStream::connect(relay.http_addr).await.expect("connect to the HTTP listener");
    let authority = format!("{name}:{}", relay.http_addr.port());
    let over_h2c = grpc_ping_pong(tcp, "http", &authority, &messages).await.expect("gRPC over h2c");

    for (what, out) in [("TLS", over_tls), ("h2c", over_h2c)] {
        assert_eq!(
            out.status,
            StatusCode::OK,
            "gRPC over {what}: body {:?}",
            String::from_utf8_lossy(&out.body)
        );
        assert_eq!(out.replies, expected, "gRPC over {what}: echoes");
        assert_eq!(
            out.trailers.get("grpc-status").map(|v| v.as_bytes()),
            Some(&b"0"[..]),
            "gRPC over {what}: grpc-status trailer (headers {:?}, trailers {:?})",
            out.headers,
            out.trailers
        );
        assert_eq!(
            out.headers.get("x-seen-te").map(|v| v.as_bytes()),
            Some(&b"trailers"[..]),
            "gRPC over {what}: the backend must see `te: trailers`"
        );
        assert_eq!(
            out.headers.get("x-seen-forwarded-for").map(|v| v.as_bytes()),
            Some(&b"127.0.0.1"[..]),
            "gRPC over {what}: X-Forwarded-For"
        );
    }
    agent.assert_running();
}

/// A WebSocket (HTTP/1.1 Upgrade) over TLS on the HTTPS listener echoes text and binary.
async fn websocket_over_https(t: Transport) {
    let s = HttpSetup::start(t).await;
    let name = format!("{}.localhost", s.url.subdomain);
    let https = s.relay.https_addr;
    let tls = tls_connect(https, &name, &s.relay.ca_path, &[b"http/1.1"])
        .await
        .expect("TLS with http/1.1");
    assert_eq!(alpn_protocol(&tls).as_deref(), Some(&b"http/1.1"[..]), "ALPN http/1.1");
    let uri = format!("wss://{name}:{}/ws", https.port());
    within(IO_TIMEOUT, "websocket over HTTPS", websocket_echo_on(tls, &uri))
        .await
        .expect("websocket echo over HTTPS");
}

/// `warren tls --hostname`: the relay routes by SNI on its HTTPS listener without decrypting,
/// so the visitor sees the backend's own certificate and the backend sees the visitor's SNI;
/// an unknown name gets the relay's own (dev-CA) certificate.
async fn tls_passthrough_by_sni(t: Transport) {
    let pki = Pki::new("https-sni-pki");
    let (cert, key) = pki.self_signed("secure", "secure.localhost");
    let backend_leaf = leaf_der(&cert);
    let backend = TlsLineBackend::start(&cert, &key).await;
    let tmp = TempDir::new("https-sni");
    let relay = Relay::start_default().await;
    let port = backend.port.to_string();
    let https_port = relay.https_addr.port();

    let mut short =
        spawn_agent(&relay, &tmp, "tls-short", t, &["tls", &port, "--hostname", "secure"]);
    let url = short.url().await;
    assert_eq!(url, format!("tls://secure.localhost:{https_port}"), "URL of --hostname secure");
    let mut full = spawn_agent(
        &relay,
        &tmp,
        "tls-full",
        t,
        &["tls", &port, "--hostname", "secure2.localhost"],
    );
    let url = full.url().await;
    assert_eq!(
        url,
        format!("tls://secure2.localhost:{https_port}"),
        "URL of --hostname NAME.localhost"
    );

    let big = warren_tests::util::hex(&random_bytes(64 * 1024));
    let lines = vec!["hello".to_owned(), "through the relay".to_owned(), big];
    for sni in ["secure.localhost", "secure2.localhost"] {
        let (tls, leaf) = tls_connect_any_cert(relay.https_addr, sni, &[b"h2", b"http/1.1"])
            .await
            .unwrap_or_else(|e| panic!("TLS to {sni} through the relay: {e:#}"));
        assert!(
            leaf == backend_leaf,
            "{sni}: the visitor must see the backend's certificate, not the relay's"
        );
        assert_eq!(
            alpn_protocol(&tls),
            None,
            "{sni}: the backend offers no ALPN, so none may be negotiated (the relay terminated TLS?)"
        );
        within(IO_TIMEOUT, "lines through the passthrough", line_round_trips(tls, sni, &lines))
            .await
            .unwrap_or_else(|e| panic!("{sni}: {e:#}"));
    }

    // A name no tunnel serves: the relay's own certificate, from its dev CA.
    let (_, leaf) = tls_connect_any_cert(relay.https_addr, "nobody.localhost", &[])
        .await
        .expect("TLS to an unknown name");
    assert!(leaf != backend_leaf, "an unknown name must not reach the passthrough backend");
    let tls = tls_connect(relay.https_addr, "nobody.localhost", &relay.ca_path, &[])
        .await
        .expect("an unknown name gets a certificate from the relay's dev CA");
    assert!(peer_leaf(&tls) == Some(leaf), "same certificate both times");
    short.assert_running();
    full.assert_running();
}

/// `--https-only`: plain HTTP (HTTP/1.1 and h2c) is redirected with 308 to the same path and
/// query on the HTTPS port; HTTPS is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_only_redirects_plain_http() {
    let tmp = TempDir::new("https-only");
    let relay = Relay::start_default().await;
    let backend = HttpBackend::start().await;
    let port = backend.port().to_string();
    let mut agent =
        spawn_agent(&relay, &tmp, "https-only", Transport::Quic, &["http", &port, "--https-only"]);
    let url = agent.url().await;
    let name = format!("{}.localhost", subdomain_of(&url));
    let https_port = relay.https_addr.port();
    let path = "/some/path?x=1&y=two";
    let location = format!("https://{name}:{https_port}{path}");

    for host in [format!("{name}:{}", relay.http_addr.port()), name.clone()] {
        let resp = within(IO_TIMEOUT, "plain GET", http_get(relay.http_addr, &host, path))
            .await
            .unwrap_or_else(|e| panic!("GET {path} with Host {host}: {e:#}"));
        assert_eq!(
            resp.status,
            StatusCode::PERMANENT_REDIRECT,
            "plain HTTP with Host {host}: body {:?}",
            resp.text()
        );
        assert_eq!(
            resp.headers.get(header::LOCATION).map(|v| v.as_bytes()),
            Some(location.as_bytes()),
            "Location for Host {host}"
        );
    }

    let tcp = TcpStream::connect(relay.http_addr).await.expect("connect to the HTTP listener");
    let authority = format!("{name}:{}", relay.http_addr.port());
    let (status, _, headers, _) = h2_get(tcp, "http", &authority, path).await.expect("h2c GET");
    assert_eq!(status, StatusCode::PERMANENT_REDIRECT, "h2c on the HTTP listener");
    assert_eq!(
        headers.get(header::LOCATION).map(|v| v.as_bytes()),
        Some(location.as_bytes()),
        "Location over h2c"
    );

    let out = curl(&relay.ca_path, &name, https_port, "/", &[]).await.expect("curl over HTTPS");
    assert_eq!(out.body, backend.greeting(), "HTTPS is served");
    let tls = tls_connect(relay.https_addr, &name, &relay.ca_path, &[b"h2"]).await.expect("TLS");
    let (status, _, _, body) =
        h2_get(tls, "https", &format!("{name}:{https_port}"), "/").await.expect("h2 GET over TLS");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(String::from_utf8_lossy(&body), backend.greeting());
    agent.assert_running();
}
