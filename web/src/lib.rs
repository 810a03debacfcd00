//! warren's web dashboards: plain HTML, CSS and JavaScript with no build step and nothing loaded
//! from elsewhere, compiled into the agent and the relay.
//!
//! - `agent.html`: the agent's tunnels and its request inspector (live, with replay), served at
//!   `/` of the agent's local API.
//! - `relay.html`: the relay's agents, tunnels, port pool, traffic charts, tokens and forwards,
//!   served at `/` of the relay's API; the admin token stays in the browser's session storage.
//!
//! It also holds what both APIs share to defend themselves: [`guard`] (allowed hosts, no
//! foreign origins, JSON bodies only, security headers) and [`throttle`] (failed
//! authentications slowed down per source address).

pub mod guard;
pub mod throttle;

/// One embedded file.
#[derive(Debug, Clone, Copy)]
pub struct Asset {
    /// Its `Content-Type`.
    pub content_type: &'static str,
    /// Its bytes.
    pub body: &'static [u8],
}

const FILES: &[(&str, &str, &[u8])] = &[
    ("agent.html", "text/html; charset=utf-8", include_bytes!("../static/agent.html")),
    ("relay.html", "text/html; charset=utf-8", include_bytes!("../static/relay.html")),
    ("style.css", "text/css; charset=utf-8", include_bytes!("../static/style.css")),
    ("common.js", "text/javascript; charset=utf-8", include_bytes!("../static/common.js")),
    ("agent.js", "text/javascript; charset=utf-8", include_bytes!("../static/agent.js")),
    ("relay.js", "text/javascript; charset=utf-8", include_bytes!("../static/relay.js")),
];

/// The file named `name` (no directories), if embedded.
pub fn get(name: &str) -> Option<Asset> {
    FILES
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, content_type, body)| Asset { content_type, body })
}

/// Every embedded file's name.
pub fn names() -> impl Iterator<Item = &'static str> {
    FILES.iter().map(|(n, _, _)| *n)
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_page_refers_only_to_embedded_files() {
        for page in ["agent.html", "relay.html"] {
            let text = std::str::from_utf8(super::get(page).unwrap().body).unwrap();
            for part in text.split("/static/").skip(1) {
                let file = part.split('"').next().unwrap();
                assert!(super::get(file).is_some(), "{page} refers to missing {file}");
            }
            assert!(
                !text.contains("http://") && !text.contains("https://"),
                "{page} loads from elsewhere"
            );
        }
        assert!(super::get("../Cargo.toml").is_none());
    }
}
