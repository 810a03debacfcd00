//! Harness for the Docker tests: a real dockerd (started by `scripts/test-all` when it is not
//! running), images built offline by `deploy/image` and `deploy/busybox-image`, and a guard
//! that removes every container and network a test made.
//!
//! Containers live on bridge networks the tests create with subnets of their own
//! ([`TEST_SUBNETS`]); traffic goes only to those containers and to loopback.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use crate::netns::{output_in, stdout_ok};
use crate::process::binary;

/// The image with both binaries, as `deploy/image` builds it from the test binaries.
pub const IMAGE: &str = "warren-test:local";
/// The demo app: static busybox with `/www/index.html`.
pub const BUSYBOX: &str = "warren-test-busybox:local";
/// What the busybox image's page says.
pub const PAGE: &str = "hello from busybox";
/// Where the tests' Docker bridge networks and plugin networks get subnets.
pub const TEST_SUBNETS: &str = "10.219.0.0/16";

const DOCKER_TIMEOUT: Duration = Duration::from_secs(120);

/// True when the Docker tests can run (root, `docker` answering); otherwise prints why and
/// returns false, or panics when `WARREN_TEST_DOCKER_REQUIRED` is set.
pub fn require() -> bool {
    let why = if !nix::unistd::geteuid().is_root() {
        Some("needs root".to_owned())
    } else {
        match Command::new("docker").args(["info", "--format", "{{.ServerVersion}}"]).output() {
            Ok(o) if o.status.success() => None,
            Ok(o) => Some(format!("docker info: {}", String::from_utf8_lossy(&o.stderr).trim())),
            Err(e) => Some(format!("no docker CLI: {e}")),
        }
    };
    match why {
        None => true,
        Some(why) => {
            assert!(
                std::env::var_os("WARREN_TEST_DOCKER_REQUIRED").is_none(),
                "WARREN_TEST_DOCKER_REQUIRED is set but the Docker tests cannot run: {why}"
            );
            eprintln!("skipped: {why}");
            false
        }
    }
}

/// The group the plugin's socket must have: `docker` from `/etc/group` when there is one, else
/// root's (0).
pub fn plugin_socket_gid() -> u32 {
    let groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
    groups
        .lines()
        .find_map(|l| l.strip_prefix("docker:"))
        .and_then(|rest| rest.split(':').nth(1))
        .and_then(|gid| gid.parse().ok())
        .unwrap_or(0)
}

/// `docker ARGS...`, bounded in time.
pub fn docker(args: &[&str]) -> Output {
    let mut cmd = Command::new("docker");
    cmd.args(args);
    output_in(None, cmd, DOCKER_TIMEOUT)
}

/// `docker ARGS...`; its trimmed stdout, or a panic with its stderr.
pub fn docker_ok(args: &[&str]) -> String {
    stdout_ok(&format!("docker {}", args.join(" ")), &docker(args)).trim().to_owned()
}

/// `docker ARGS...` that must fail; its stderr.
pub fn docker_fails(args: &[&str]) -> String {
    let out = docker(args);
    assert!(
        !out.status.success(),
        "docker {} succeeded but should fail: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Builds [`IMAGE`] and [`BUSYBOX`] once per test process, from the binaries the tests run.
pub fn images() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let bin_dir = binary("warren").parent().map(Path::to_path_buf).expect("binary dir");
        for (script, args) in [
            ("deploy/image", vec!["--bin-dir", bin_dir.to_str().expect("utf-8"), "--tag", IMAGE]),
            ("deploy/busybox-image", vec!["--tag", BUSYBOX]),
        ] {
            let tag = args.last().copied().unwrap_or_default();
            let before = image_id(tag);
            let mut cmd = Command::new(repo().join(script));
            cmd.args(&args);
            let out = output_in(None, cmd, DOCKER_TIMEOUT);
            stdout_ok(script, &out);
            // The image the tag named before is untagged now: removed, so that runs do not
            // pile up images.
            if let Some(old) = before.filter(|old| image_id(tag).as_ref() != Some(old)) {
                let _ = docker(&["image", "rm", &old]);
            }
        }
    });
}

/// The id of the image `tag`, if there is one.
fn image_id(tag: &str) -> Option<String> {
    let out = docker(&["image", "inspect", "-f", "{{.Id}}", tag]);
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Removes the containers and networks a test made, whatever happens to the test.
#[derive(Debug, Default)]
pub struct Cleanup {
    containers: Vec<String>,
    networks: Vec<String>,
}

impl Cleanup {
    /// A container (by name) to remove.
    pub fn container(&mut self, name: &str) -> String {
        self.containers.push(name.to_owned());
        name.to_owned()
    }

    /// A network (by name) to remove, after the containers.
    pub fn network(&mut self, name: &str) -> String {
        self.networks.push(name.to_owned());
        name.to_owned()
    }

    /// Removes everything now (also done on drop).
    pub fn run(&mut self) {
        for c in self.containers.drain(..).rev() {
            let _ = docker(&["rm", "-f", &c]);
        }
        for n in self.networks.drain(..).rev() {
            let _ = docker(&["network", "rm", &n]);
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.run();
    }
}

/// A Docker bridge network of the test's own (`10.219.N.0/24`): its name and gateway, the
/// host's own address on it.
pub fn bridge_network(cleanup: &mut Cleanup, name: &str, n: u8) -> (String, std::net::Ipv4Addr) {
    let subnet = format!("10.219.{n}.0/24");
    let gateway = std::net::Ipv4Addr::new(10, 219, n, 1);
    let name = cleanup.network(name);
    let _ = docker(&["network", "rm", &name]);
    docker_ok(&[
        "network",
        "create",
        "--subnet",
        &subnet,
        "--gateway",
        &gateway.to_string(),
        &name,
    ]);
    (name, gateway)
}

/// The address of container `name` on network `net`.
pub fn container_ip(name: &str, net: &str) -> String {
    docker_ok(&[
        "inspect",
        "-f",
        &format!("{{{{(index .NetworkSettings.Networks \"{net}\").IPAddress}}}}"),
        name,
    ])
}

/// `GET /` over HTTP/1.0 from inside container `name` with busybox `nc`: the response.
pub fn nc_get(name: &str, host: &str, port: u16) -> Output {
    docker(&[
        "exec",
        name,
        "sh",
        "-c",
        &format!("printf 'GET / HTTP/1.0\\r\\nHost: {host}\\r\\n\\r\\n' | nc -w 5 {host} {port}"),
    ])
}
