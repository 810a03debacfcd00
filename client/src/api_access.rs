//! How the CLI finds a running agent's local API and proves it may use it.
//!
//! - **The token.** Every route of the local API but the dashboard's files needs
//!   `Authorization: Bearer TOKEN`. The token is `--api-token` / `WARREN_API_TOKEN`, or the one
//!   generated on first start into `CONFIG_DIR/api-token` (0600, directory 0700) and reused.
//! - **`CONFIG_DIR/agent.json`** (0600) lists the agents running with that config directory:
//!   each one's API address, pid, start time, token file and whether it manages networks. An
//!   agent adds itself once its API listens and takes itself out when it stops; entries of dead
//!   processes are dropped by whoever writes next. The CLI (`warren ls`, `stop`, `requests`,
//!   `replay`, `net ...`) talks to the newest live one, so a process that took port 4040 first
//!   never receives a call or a token; `--agent-api` names another.
//!
//! The file is rewritten whole (temporary file, then rename) under an exclusive `flock` of
//! `agent.json.lock`, so agents starting together do not lose each other's entries.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The token file's name in the config directory.
pub const TOKEN_FILE: &str = "api-token";
/// The running agents' file in the config directory.
pub const AGENTS_FILE: &str = "agent.json";

/// One running agent, as `agent.json` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    /// Where its local API listens.
    pub api: SocketAddr,
    /// Its process id.
    pub pid: u32,
    /// When it started, in milliseconds since the Unix epoch.
    pub started_ms: u64,
    /// The file its API token is in; `None` when the token was given with `--api-token`.
    pub token_file: Option<PathBuf>,
    /// Whether it manages networks (`warren agent` as root), so `warren net` goes there.
    #[serde(default)]
    pub networks: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct AgentsFile {
    agents: Vec<AgentRecord>,
}

/// The API token in `dir/api-token`, generated there (0600) when absent. Two agents starting
/// at once end up with the same token.
pub fn load_or_create_token(dir: &Path) -> Result<(String, PathBuf), String> {
    let path = crate::identity::private_config_file(dir, TOKEN_FILE)?;
    let read = |path: &Path| -> Result<Option<String>, String> {
        match std::fs::read_to_string(path) {
            Ok(s) if s.trim().len() >= 16 => Ok(Some(s.trim().to_owned())),
            Ok(_) => Err(format!(
                "{}: the API token there is empty or too short (16 characters at least); \
                 remove the file to have a new one generated",
                path.display()
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("reading {}: {e}", path.display())),
        }
    };
    if let Some(token) = read(&path)? {
        return Ok((token, path));
    }
    let token = warren_server::util::random_alnum(40);
    if crate::identity::write_once(&path, &format!("{token}\n"))? {
        return Ok((token, path));
    }
    // Another agent made it first: use what it wrote.
    read(&path)?
        .map(|t| (t, path.clone()))
        .ok_or_else(|| format!("{}: cannot create the API token file", path.display()))
}

/// Whether process `pid` is alive (exists, whoever owns it).
fn alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else { return false };
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => true,
        Err(e) => e == nix::errno::Errno::EPERM,
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Runs `change` on the agents file of `dir` under its lock, writing the result back.
fn update(dir: &Path, change: impl FnOnce(&mut Vec<AgentRecord>)) -> Result<(), String> {
    use nix::fcntl::{Flock, FlockArg};
    use std::os::unix::fs::OpenOptionsExt;
    warren_server::util::private_dir(dir)
        .map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let lock_path = dir.join(format!("{AGENTS_FILE}.lock"));
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(|e| format!("opening {}: {e}", lock_path.display()))?;
    let _lock = Flock::lock(lock, FlockArg::LockExclusive)
        .map_err(|(_, e)| format!("locking {}: {e}", lock_path.display()))?;
    let path = dir.join(AGENTS_FILE);
    let mut agents = read_agents(&path);
    agents.retain(|a| alive(a.pid) && a.pid != std::process::id());
    change(&mut agents);
    let text = serde_json::to_string_pretty(&AgentsFile { agents })
        .map_err(|e| format!("encoding {}: {e}", path.display()))?;
    let tmp = dir.join(format!(".{AGENTS_FILE}.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let write = || -> std::io::Result<()> {
        let mut f: File = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.write_all(b"\n")?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("writing {}: {e}", path.display())
    })
}

fn read_agents(path: &Path) -> Vec<AgentRecord> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice::<AgentsFile>(&bytes).map(|f| f.agents).unwrap_or_else(
            |e| {
                tracing::warn!(file = %path.display(), error = %e, "unreadable list of running agents; starting it afresh");
                Vec::new()
            },
        ),
        Err(_) => Vec::new(),
    }
}

/// This agent's entry in `agent.json`; taken out again when dropped.
#[derive(Debug)]
pub struct Registration {
    dir: PathBuf,
}

/// Adds this process to `dir/agent.json` as serving its API at `api`.
pub fn register(
    dir: &Path,
    api: SocketAddr,
    token_file: Option<PathBuf>,
    networks: bool,
) -> Result<Registration, String> {
    let me =
        AgentRecord { api, pid: std::process::id(), started_ms: now_ms(), token_file, networks };
    update(dir, |agents| agents.push(me))?;
    Ok(Registration { dir: dir.to_owned() })
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Err(e) = update(&self.dir, |_| {}) {
            tracing::debug!(error = %e, "cannot take this agent out of the running agents' list");
        }
    }
}

/// The live agents of `dir/agent.json`, newest first.
pub fn running(dir: &Path) -> Vec<AgentRecord> {
    let mut agents: Vec<AgentRecord> =
        read_agents(&dir.join(AGENTS_FILE)).into_iter().filter(|a| alive(a.pid)).collect();
    agents.sort_by_key(|a| std::cmp::Reverse(a.started_ms));
    agents
}

/// Which agent a command wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Any agent (tunnels, requests).
    Any,
    /// One that manages networks (`warren net`).
    Networks,
}

/// A local API to call: where, and with which token.
#[derive(Debug, Clone)]
pub struct LocalApi {
    /// Its address.
    pub addr: SocketAddr,
    /// The bearer token, when known.
    pub token: Option<String>,
    /// Why the token is unknown, for the error message of a 401.
    pub token_hint: String,
}

/// Picks the API a command talks to: `addr` and `token` (flags or environment) win; otherwise
/// the newest live agent of `dir/agent.json` (for [`Want::Networks`], the newest that manages
/// networks) and its token file, else `dir/api-token`.
pub fn resolve(
    addr: Option<SocketAddr>,
    token: Option<String>,
    dir: &Path,
    want: Want,
) -> Result<LocalApi, String> {
    let agents = running(dir);
    let pick = |a: &&AgentRecord| want == Want::Any || a.networks;
    let (addr, record) = match addr {
        Some(addr) => (addr, agents.iter().find(|a| a.api == addr).cloned()),
        None => {
            let Some(a) = agents.iter().find(pick).or_else(|| agents.first()) else {
                return Err(format!(
                    "no running agent found in {} (start `warren agent`, or `warren http ...`; \
                     if it runs as another user, e.g. root, run this command as that user too \
                     or pass --agent-api ADDR and --api-token TOKEN)",
                    dir.join(AGENTS_FILE).display()
                ));
            };
            (a.api, Some(a.clone()))
        }
    };
    let token_hint;
    let token = match token.filter(|t| !t.is_empty()) {
        Some(t) => {
            token_hint = "the token given with --api-token or WARREN_API_TOKEN".to_owned();
            Some(t)
        }
        None => {
            let file = match &record {
                Some(AgentRecord { token_file: None, .. }) => None,
                Some(AgentRecord { token_file: Some(f), .. }) => Some(f.clone()),
                None => Some(dir.join(TOKEN_FILE)),
            };
            match file {
                Some(f) => {
                    token_hint = format!("the token in {}", f.display());
                    std::fs::read_to_string(&f).ok().map(|s| s.trim().to_owned())
                }
                None => {
                    token_hint = "no token: that agent was started with --api-token; pass the \
                                  same --api-token or WARREN_API_TOKEN"
                        .to_owned();
                    None
                }
            }
        }
    };
    Ok(LocalApi { addr, token, token_hint })
}

/// The agent answered with an error status.
#[derive(Debug)]
pub struct Refused {
    /// Where.
    pub addr: SocketAddr,
    /// The status.
    pub status: http::StatusCode,
    /// Its message.
    pub message: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the agent at {} answered {}: {}", self.addr, self.status, self.message)
    }
}

impl std::error::Error for Refused {}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Nothing answered, or the connection broke.
    #[error("{0}")]
    Unreachable(String),
    /// The agent answered with an error status.
    #[error(transparent)]
    Refused(#[from] Refused),
}

impl LocalApi {
    /// One request; the JSON answer, or why not.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
        timeout: Duration,
    ) -> Result<serde_json::Value, CallError> {
        use http_body_util::BodyExt;
        let addr = self.addr;
        let unreachable = |e: &dyn std::fmt::Display| {
            CallError::Unreachable(format!(
                "no agent answers at {addr} ({e}): is `warren` running there? (--agent-api ADDR \
                 or WARREN_AGENT_API)"
            ))
        };
        let work = async {
            let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| unreachable(&e))?;
            let (mut send, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                    .await
                    .map_err(|e| unreachable(&e))?;
            let conn = tokio::spawn(conn);
            let _conn = tokio_util::task::AbortOnDropHandle::new(conn);
            let mut req = http::Request::builder()
                .method(method)
                .uri(path)
                .header(http::header::HOST, addr.to_string());
            if body.is_some() {
                req = req.header(http::header::CONTENT_TYPE, "application/json");
            }
            if let Some(t) = &self.token {
                req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
            }
            let req = req
                .body(http_body_util::Full::new(bytes::Bytes::from(body.unwrap_or_default())))
                .map_err(|e| CallError::Unreachable(format!("bad request {path}: {e}")))?;
            let resp = send.send_request(req).await.map_err(|e| unreachable(&e))?;
            let status = resp.status();
            let bytes = resp.into_body().collect().await.map_err(|e| unreachable(&e))?.to_bytes();
            Ok::<_, CallError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(timeout, work).await.map_err(|_| {
            CallError::Unreachable(format!("the agent at {addr} did not answer in time"))
        })??;
        let v: serde_json::Value =
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        if status.is_success() {
            return Ok(v);
        }
        let mut message = v["error"]["message"].as_str().unwrap_or("no message").to_owned();
        if status == http::StatusCode::UNAUTHORIZED {
            message = format!("{message} (sent {})", self.token_hint);
        }
        Err(Refused { addr, status, message }.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_made_once_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("warren-api-token-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (a, path) = load_or_create_token(&dir).unwrap();
        let (b, _) = load_or_create_token(&dir).unwrap();
        assert_eq!(a, b);
        assert!(a.len() >= 32);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        std::fs::write(&path, "short\n").unwrap();
        assert!(load_or_create_token(&dir).unwrap_err().contains("too short"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn agents_file_lists_the_live_newest_first() {
        let dir = std::env::temp_dir().join(format!("warren-agents-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let api: SocketAddr = "127.0.0.1:4040".parse().unwrap();
        // A dead process's entry (pid far beyond pid_max) is dropped by the next writer.
        update(&dir, |a| {
            a.push(AgentRecord {
                api: "127.0.0.1:4999".parse().unwrap(),
                pid: 0x3fff_fff0,
                started_ms: u64::MAX,
                token_file: None,
                networks: true,
            })
        })
        .unwrap();
        let reg = register(&dir, api, Some(dir.join(TOKEN_FILE)), false).unwrap();
        let live = running(&dir);
        assert_eq!(live.len(), 1);
        assert_eq!(live[0].api, api);
        std::fs::write(dir.join(TOKEN_FILE), "abcdefghijklmnopqrstuvwxyz\n").unwrap();
        let found = resolve(None, None, &dir, Want::Networks).unwrap();
        assert_eq!(found.addr, api, "falls back to any agent when none manages networks");
        assert_eq!(found.token.as_deref(), Some("abcdefghijklmnopqrstuvwxyz"));
        let flagged = resolve(None, Some("given".into()), &dir, Want::Any).unwrap();
        assert_eq!(flagged.token.as_deref(), Some("given"));
        drop(reg);
        assert!(running(&dir).is_empty());
        assert!(resolve(None, None, &dir, Want::Any).unwrap_err().contains("no running agent"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
