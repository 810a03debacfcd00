//! The agent's stable identity, kept in its config directory.
//!
//! Leases on the relay belong to (token, agent identity, tunnel name): an agent that restarts
//! with the same identity gets its subdomains and ports back. The identity is generated once
//! (`HOSTNAME-RANDOM`) into `CONFIG_DIR/agent-id`.
//!
//! The config directory is its owner's alone (0700) and the files in it 0600; wider modes are
//! tightened at start with a WARN naming each (`warren_server::util::private_dir`).

use std::path::{Path, PathBuf};

use warren_proto::AgentId;

/// The config directory: `$WARREN_CONFIG_DIR` (or the flag), else `$XDG_CONFIG_HOME/warren`, else
/// `$HOME/.config/warren`, else `./.warren`.
pub fn default_config_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("warren");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(h).join(".config").join("warren");
    }
    PathBuf::from(".warren")
}

fn hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_default();
    let clean: String = raw
        .trim()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c.to_ascii_lowercase() } else { '-' })
        .take(40)
        .collect();
    if clean.is_empty() { "agent".into() } else { clean }
}

/// Creates the config directory `dir` (0700), or tightens it, and checks the mode of its
/// secret `file`, if there.
pub fn private_config_file(dir: &Path, file: &str) -> Result<PathBuf, String> {
    use warren_server::util;
    util::private_dir(dir).map_err(|e| format!("the config directory {}: {e}", dir.display()))?;
    let path = dir.join(file);
    util::check_private_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

/// Reads the identity from `dir/agent-id`, creating it when absent.
pub fn load_or_create(dir: &Path) -> Result<AgentId, String> {
    let path = private_config_file(dir, "agent-id")?;
    if let Ok(s) = std::fs::read_to_string(&path) {
        return AgentId::parse(s.trim()).map_err(|e| format!("{}: {e}", path.display()));
    }
    let suffix = warren_server::util::random_alnum(8);
    let id = AgentId::parse(&format!("{}-{suffix}", hostname()))
        .map_err(|e| format!("generated agent id: {e}"))?;
    if write_once(&path, &format!("{id}\n"))? {
        return Ok(id);
    }
    let s =
        std::fs::read_to_string(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    AgentId::parse(s.trim()).map_err(|e| format!("{}: {e}", path.display()))
}

/// Creates the secret file `path` (0600) holding `contents` unless it exists; `false` when
/// another process made it first. Two agents starting at once must end up with the same file:
/// it is written to a temporary file and linked into place, and whoever links first wins.
pub fn write_once(path: &Path, contents: &str) -> Result<bool, String> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    warren_server::util::write_private(&tmp, contents.as_bytes())
        .map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    Ok(linked.is_ok())
}
