//! The config file of `warren start`: TOML, every problem reported with its line.
//!
//! ```toml
//! relay = "relay.example.com:7443"
//! token = "s3cret"
//! [tunnels.web]
//! proto = "http"
//! target = "8080"
//! subdomain = "shop"
//! ```

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::Spanned;
use toml::de::{DeTable, DeValue};
use warren_proto::{Protocol, Subdomain, TunnelName};
use warren_transport::Mode;

use crate::inspect::Limits;
use crate::tunnel::{OPTION_KEYS, Target, TunnelSpec};

/// A config file, parsed and checked. Fields left out are `None` and come from flags or the
/// environment (or defaults).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileConfig {
    /// `relay = "HOST:PORT"`.
    pub relay: Option<String>,
    /// `token = "..."`.
    pub token: Option<String>,
    /// `transport = "auto" | "quic" | "tcp"`.
    pub transport: Option<Mode>,
    /// `relay_ca = "path/to/ca.pem"`, relative to the file.
    pub relay_ca: Option<PathBuf>,
    /// `relay_fingerprint = "hex"`.
    pub relay_fingerprint: Option<String>,
    /// `insecure = true`.
    pub insecure: bool,
    /// `agent_id = "..."`.
    pub agent_id: Option<String>,
    /// `allow_forward = ["8080", "10.0.0.0/8:80-443"]`: targets the relay's API may forward to.
    pub allow_forward: Vec<crate::tunnel::ForwardRule>,
    /// `inspect_max_requests = 1000`: most HTTP exchanges the inspector keeps.
    pub inspect_max_requests: Option<usize>,
    /// `inspect_max_bytes = "32MiB"` (or a number of bytes): most memory they may hold.
    pub inspect_max_bytes: Option<usize>,
    /// `[tunnels.NAME]` tables, in file order.
    pub tunnels: Vec<TunnelSpec>,
}

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// Every problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file.
    pub path: PathBuf,
    /// The problems, in file order (empty when the file could not be read at all).
    pub problems: Vec<Problem>,
    /// Set when the file could not be read.
    pub unreadable: Option<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(why) = &self.unreadable {
            return write!(f, "cannot read config file {}: {why}", self.path.display());
        }
        write!(f, "config file {} has {} problem(s):", self.path.display(), self.problems.len())?;
        for p in &self.problems {
            write!(f, "\n  {}:line {}: {}", self.path.display(), p.line, p.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Reads and checks a config file.
pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        path: path.into(),
        problems: Vec::new(),
        unreadable: Some(e.to_string()),
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse(&text, base).map_err(|problems| ConfigError {
        path: path.into(),
        problems,
        unreadable: None,
    })
}

struct Ctx<'a> {
    text: &'a str,
    problems: Vec<Problem>,
}

impl Ctx<'_> {
    fn line(&self, span: Range<usize>) -> usize {
        self.text[..span.start.min(self.text.len())].bytes().filter(|b| *b == b'\n').count() + 1
    }
    fn err(&mut self, span: Range<usize>, message: impl Into<String>) {
        let line = self.line(span);
        self.problems.push(Problem { line, message: message.into() });
    }
    fn string(&mut self, key: &str, v: &Spanned<DeValue<'_>>) -> Option<String> {
        match v.get_ref().as_str() {
            Some(s) => Some(s.to_owned()),
            None => {
                self.err(v.span(), format!("`{key}` must be a string"));
                None
            }
        }
    }
    /// An inspector cap: a number, or a string `parse` reads (a size with its unit).
    fn cap(
        &mut self,
        key: &str,
        v: &Spanned<DeValue<'_>>,
        parse: fn(&str) -> Result<usize, String>,
    ) -> Option<usize> {
        let text = match v.get_ref() {
            DeValue::Integer(i) => match u64::from_str_radix(i.as_str(), i.radix()) {
                Ok(n) => n.to_string(),
                Err(_) => i.as_str().to_owned(),
            },
            DeValue::String(s) => s.to_string(),
            _ => {
                self.err(v.span(), format!("`{key}` must be a number or a string"));
                return None;
            }
        };
        parse(&text).map_err(|e| self.err(v.span(), format!("`{key}`: {e}"))).ok()
    }
}

/// Parses config text; relative paths are taken from `base`.
pub fn parse(text: &str, base: &Path) -> Result<FileConfig, Vec<Problem>> {
    let mut cx = Ctx { text, problems: Vec::new() };
    let (doc, errors) = DeTable::parse_recoverable(text);
    for e in errors {
        let span = e.span().unwrap_or(0..0);
        let msg = e.message().trim().to_owned();
        cx.err(span, format!("syntax: {msg}"));
    }
    if !cx.problems.is_empty() {
        return Err(cx.problems);
    }
    let mut out = FileConfig::default();
    let mut entries: Vec<_> = doc.get_ref().iter().collect();
    entries.sort_by_key(|(k, _)| k.span().start);
    for (key, value) in entries {
        let k = key.get_ref().as_ref();
        match k {
            "relay" => out.relay = cx.string(k, value),
            "token" => out.token = cx.string(k, value),
            "agent_id" => out.agent_id = cx.string(k, value),
            "relay_fingerprint" => out.relay_fingerprint = cx.string(k, value),
            "relay_ca" => out.relay_ca = cx.string(k, value).map(|p| base.join(p)),
            "transport" => {
                if let Some(s) = cx.string(k, value) {
                    match s.parse::<Mode>() {
                        Ok(m) => out.transport = Some(m),
                        Err(e) => cx.err(value.span(), e),
                    }
                }
            }
            "allow_forward" => match value.get_ref().as_array() {
                Some(items) => {
                    for item in items.iter() {
                        match item.get_ref().as_str().map(str::parse::<crate::tunnel::ForwardRule>) {
                            Some(Ok(rule)) => out.allow_forward.push(rule),
                            Some(Err(e)) => cx.err(item.span(), e),
                            None => cx.err(item.span(), "`allow_forward` items are strings"),
                        }
                    }
                }
                None => cx.err(value.span(), "`allow_forward` must be a list of strings"),
            },
            "inspect_max_requests" => {
                out.inspect_max_requests = cx.cap(k, value, Limits::parse_requests);
            }
            "inspect_max_bytes" => out.inspect_max_bytes = cx.cap(k, value, Limits::parse_bytes),
            "insecure" => match value.get_ref().as_bool() {
                Some(b) => out.insecure = b,
                None => cx.err(value.span(), "`insecure` must be true or false"),
            },
            "tunnels" => match value.get_ref().as_table() {
                Some(t) => {
                    let mut tunnels: Vec<_> = t.iter().collect();
                    tunnels.sort_by_key(|(k, _)| k.span().start);
                    for (name, body) in tunnels {
                        if let Some(spec) = tunnel(&mut cx, name, body) {
                            out.tunnels.push(spec);
                        }
                    }
                }
                None => cx.err(value.span(), "`tunnels` must be a table of [tunnels.NAME] tables"),
            },
            other => cx.err(
                key.span(),
                format!("unknown key `{other}` (expected relay, token, transport, relay_ca, relay_fingerprint, insecure, agent_id, allow_forward, inspect_max_requests, inspect_max_bytes or [tunnels.NAME])"),
            ),
        }
    }
    if cx.problems.is_empty() { Ok(out) } else { Err(cx.problems) }
}

fn tunnel(
    cx: &mut Ctx<'_>,
    name: &Spanned<std::borrow::Cow<'_, str>>,
    body: &Spanned<DeValue<'_>>,
) -> Option<TunnelSpec> {
    let before = cx.problems.len();
    let tname = match TunnelName::parse(name.get_ref()) {
        Ok(n) => Some(n),
        Err(e) => {
            cx.err(name.span(), e.to_string());
            None
        }
    };
    let Some(table) = body.get_ref().as_table() else {
        cx.err(body.span(), format!("tunnel `{}` must be a table", name.get_ref()));
        return None;
    };
    let (mut proto, mut target, mut subdomain, mut port) = (None, None, None, None);
    let mut hostname = None;
    let mut options: Vec<(String, String, Range<usize>)> = Vec::new();
    let mut fields: Vec<_> = table.iter().collect();
    fields.sort_by_key(|(k, _)| k.span().start);
    for (key, value) in fields {
        let k = key.get_ref().as_ref();
        match k {
            "proto" => {
                if let Some(s) = cx.string(k, value) {
                    match s.as_str() {
                        "http" => proto = Some(Protocol::Http),
                        "tcp" => proto = Some(Protocol::Tcp),
                        "tls" => proto = Some(Protocol::Tls),
                        "udp" => proto = Some(Protocol::Udp),
                        other => cx.err(
                            value.span(),
                            format!("unknown proto {other:?}: expected \"http\", \"tcp\", \"tls\" or \"udp\""),
                        ),
                    }
                }
            }
            "target" => {
                let s = match value.get_ref() {
                    DeValue::Integer(i) => Some(i.as_str().to_owned()),
                    _ => cx.string(k, value),
                };
                if let Some(s) = s {
                    match s.parse::<Target>() {
                        Ok(t) => target = Some(t),
                        Err(e) => cx.err(value.span(), e),
                    }
                }
            }
            "subdomain" => {
                if let Some(s) = cx.string(k, value) {
                    match Subdomain::parse(&s) {
                        Ok(s) => subdomain = Some(s),
                        Err(e) => cx.err(value.span(), e.to_string()),
                    }
                }
            }
            "hostname" => hostname = cx.string(k, value),
            "remote_port" => match value.get_ref() {
                DeValue::Integer(i) => match u16::from_str_radix(i.as_str(), i.radix()) {
                    Ok(p) if p != 0 => port = Some(p),
                    _ => cx.err(value.span(), "`remote_port` must be a port number, 1-65535"),
                },
                _ => cx.err(value.span(), "`remote_port` must be a number"),
            },
            k if OPTION_KEYS.contains(&k) => {
                let scalar = |v: &DeValue<'_>| match v {
                    DeValue::String(s) => Some(s.to_string()),
                    DeValue::Integer(i) => Some(i.as_str().to_owned()),
                    DeValue::Boolean(b) => Some(b.to_string()),
                    _ => None,
                };
                match value.get_ref() {
                    DeValue::Array(items) => {
                        for item in items {
                            match scalar(item.get_ref()) {
                                Some(v) => options.push((k.to_owned(), v, item.span())),
                                None => cx.err(item.span(), format!("`{k}` entries must be strings")),
                            }
                        }
                    }
                    v => match scalar(v) {
                        Some(v) => options.push((k.to_owned(), v, value.span())),
                        None => cx.err(value.span(), format!("`{k}` must be a string, number, boolean or a list of strings")),
                    },
                }
            }
            other => cx.err(
                key.span(),
                format!(
                    "tunnel `{}`: unknown key `{other}` (expected proto, target, subdomain, hostname, remote_port or one of {})",
                    name.get_ref(),
                    OPTION_KEYS.join(", ")
                ),
            ),
        }
    }
    if proto.is_none() {
        cx.err(
            name.span(),
            format!(
                "tunnel `{}` needs `proto = \"http\"`, `\"tcp\"`, `\"tls\"` or `\"udp\"`",
                name.get_ref()
            ),
        );
    }
    if target.is_none() && !cx.problems[before..].iter().any(|p| p.message.contains("target")) {
        cx.err(
            name.span(),
            format!("tunnel `{}` needs `target = \"PORT\"` or `\"HOST:PORT\"`", name.get_ref()),
        );
    }
    let (Some(tname), Some(proto), Some(target)) = (tname, proto, target) else { return None };
    let mut spec = TunnelSpec::new(tname, proto, target);
    spec.subdomain = subdomain;
    spec.hostname = hostname;
    spec.remote_port = port;
    for (k, v, span) in options {
        if let Err(e) = spec.apply(&k, &v) {
            cx.err(span, format!("`{k}`: {e}"));
        }
    }
    if cx.problems.len() == before
        && let Err(e) = spec.check()
    {
        cx.err(name.span(), e);
    }
    (cx.problems.len() == before).then_some(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_good_file() {
        let text = r#"
relay = "relay.example.com:7443"
token = "s3cret"
transport = "tcp"
relay_ca = "ca.pem"

[tunnels.web]
proto = "http"
target = "8080"
subdomain = "Shop"

[tunnels.db]
proto = "tcp"
target = "127.0.0.1:5432"
remote_port = 20432
"#;
        let c = parse(text, Path::new("/etc/warren")).unwrap();
        assert_eq!(c.relay.as_deref(), Some("relay.example.com:7443"));
        assert_eq!(c.transport, Some(Mode::Tcp));
        assert_eq!(c.relay_ca, Some(PathBuf::from("/etc/warren/ca.pem")));
        assert_eq!(c.tunnels.len(), 2);
        assert_eq!(c.tunnels[0].name.as_str(), "web");
        assert_eq!(c.tunnels[0].subdomain.as_ref().map(Subdomain::as_str), Some("shop"));
        assert_eq!(c.tunnels[1].remote_port, Some(20432));
    }

    #[test]
    fn every_problem_is_listed_with_its_line() {
        let text = "relay = \"r:1\"\ncolour = \"blue\"\n[tunnels.a]\nproto = \"http\"\ntarget = \"80\"\nsubdomain = \"bad_name\"\n[tunnels.b]\nproto = \"tcp\"\nremot_port = 3\ntarget = \"x\"\n";
        let problems = parse(text, Path::new(".")).unwrap_err();
        let lines: Vec<usize> = problems.iter().map(|p| p.line).collect();
        assert_eq!(lines, vec![2, 6, 9, 10], "{problems:?}");
        assert!(problems[1].message.contains("invalid subdomain"));
        assert!(problems[2].message.contains("remot_port"));
    }

    #[test]
    fn inspector_caps_take_numbers_and_sizes() {
        let c =
            parse("inspect_max_requests = 50\ninspect_max_bytes = \"512KiB\"\n", Path::new("."))
                .unwrap();
        assert_eq!((c.inspect_max_requests, c.inspect_max_bytes), (Some(50), Some(512 << 10)));
        let c = parse("inspect_max_bytes = 1048576\n", Path::new(".")).unwrap();
        assert_eq!(c.inspect_max_bytes, Some(1 << 20));
        let text =
            "inspect_max_requests = 0\ninspect_max_bytes = \"1KiB\"\ninspect_max_requests = true\n";
        let problems = parse(&text[..text.len() - 28], Path::new(".")).unwrap_err();
        let lines: Vec<usize> = problems.iter().map(|p| p.line).collect();
        assert_eq!(lines, vec![1, 2], "{problems:?}");
        assert!(problems[0].message.contains("--inspect false"), "{problems:?}");
        let problems = parse("inspect_max_requests = true\n", Path::new(".")).unwrap_err();
        assert!(problems[0].message.contains("a number"), "{problems:?}");
    }

    #[test]
    fn syntax_errors_have_lines() {
        let problems =
            parse("relay = \"x:1\"\n[tunnels.a\nproto = 1\n", Path::new(".")).unwrap_err();
        assert!(!problems.is_empty());
        assert_eq!(problems[0].line, 2, "{problems:?}");
    }

    #[test]
    fn the_example_in_the_repo_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/warren.toml");
        let c = load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert!(!c.tunnels.is_empty());
        assert_eq!(c.allow_forward.len(), 2);
        assert_eq!(c.inspect_max_bytes, Some(32 << 20));
    }

    #[test]
    fn forward_rules() {
        let c = parse("allow_forward = [\"8080\", \"10.0.0.0/8\"]\n", Path::new(".")).unwrap();
        let t: Target = "10.1.2.3:22".parse().unwrap();
        assert!(c.allow_forward.iter().any(|r| r.covers(&t)));
        let problems = parse("allow_forward = [\"nope\", 3]\nallow_forward2 = 1\n", Path::new("."))
            .unwrap_err();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].message.contains("invalid forward rule"), "{problems:?}");
    }
}
