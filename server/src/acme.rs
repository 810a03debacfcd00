//! Certificates from an ACME CA (Let's Encrypt, ZeroSSL, a private step-ca or pebble) for the
//! HTTPS listener, obtained with HTTP-01 challenges that the relay's HTTP listener answers.
//!
//! When an HTTP tunnel is bound as `NAME.domain` and no certificate from `--cert-dir` (or an
//! earlier ACME order) covers that name, the relay orders one in the background; until it
//! arrives, the development CA's certificate is served. The account key, and every certificate
//! with its key, are kept in `DATA/acme/` and loaded again at start. Certificates are renewed
//! once two thirds of their lifetime have passed. A failed order is retried after
//! [`RETRY_AFTER`], or at the next bind after that.
//!
//! Orders are budgeted, since every new tunnel name would otherwise start one: at most
//! [`MAX_ORDERS_IN_FLIGHT`] run at once and at most `--acme-orders-per-hour` start in any hour.
//! Names past that wait in a queue (bounded by [`QUEUE_LIMIT`], each name once) and are served
//! with the fallback certificate meanwhile; the queue is said once in the log each time it
//! starts to fill.
//!
//! Wildcards need DNS-01 challenges, which the relay cannot answer; each name gets its own
//! certificate.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::certstore::CertStore;
use crate::util::{days_from_civil, write_private};

/// Let's Encrypt's production directory.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// How long after a failed order the same name is tried again.
pub const RETRY_AFTER: Duration = Duration::from_secs(600);

/// How many orders may run at once.
pub const MAX_ORDERS_IN_FLIGHT: usize = 4;

/// The default of `--acme-orders-per-hour`.
pub const DEFAULT_ORDERS_PER_HOUR: u32 = 50;

/// How many names may wait for an order; names past it are not queued (they are asked for again
/// at their next bind or renewal check).
pub const QUEUE_LIMIT: usize = 1024;

/// The window of the hourly budget.
const HOUR: Duration = Duration::from_secs(3600);

/// How often waiting names are looked at again, for budget that freed up with time.
const PUMP_EVERY: Duration = Duration::from_secs(30);

/// Where ACME orders go and who is asking.
#[derive(Debug, Clone)]
pub struct AcmeSettings {
    /// The account's contact address.
    pub email: String,
    /// The CA's directory URL.
    pub directory: String,
    /// A root certificate (PEM) to trust for the directory's HTTPS instead of the system's,
    /// for private and test CAs.
    pub directory_ca: Option<PathBuf>,
    /// How many orders may start in any hour; names past it wait in a queue.
    pub orders_per_hour: u32,
}

/// The answers to pending HTTP-01 challenges, by token; the HTTP listener serves them at
/// `/.well-known/acme-challenge/TOKEN` for any host.
#[derive(Debug, Clone, Default)]
pub struct Challenges(Arc<Mutex<HashMap<String, String>>>);

/// The path prefix of HTTP-01 challenges.
pub const CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

impl Challenges {
    /// The key authorization for `token`, if a challenge for it is pending.
    pub fn get(&self, token: &str) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).get(token).cloned()
    }

    fn put(&self, token: &str, key_authorization: &str) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(token.to_owned(), key_authorization.to_owned());
    }

    fn remove(&self, token: &str) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(token);
    }
}

/// Why an order failed.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    /// The ACME server or the HTTP client said no.
    #[error("{0}")]
    Acme(#[from] instant_acme::Error),
    /// Reading or writing the data directory.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The system error.
        source: std::io::Error,
    },
    /// The order did not go as RFC 8555 says it should.
    #[error("{0}")]
    Order(String),
}

/// Obtains and renews certificates; see the module docs.
pub struct Acme {
    settings: AcmeSettings,
    dir: PathBuf,
    store: Arc<CertStore>,
    challenges: Challenges,
    account: OnceCell<Account>,
    /// Names with an order running, and names whose last order failed (and when).
    state: Mutex<AcmeState>,
}

impl std::fmt::Debug for Acme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acme")
            .field("directory", &self.settings.directory)
            .field("registered", &self.account.initialized())
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct AcmeState {
    budget: Budget,
    failed: HashMap<String, Instant>,
}

/// What [`Budget::ask`] did with a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Asked {
    /// It waits its turn now (see [`Budget::next`]).
    Queued,
    /// It was already running or waiting.
    Known,
    /// The queue is full; it was not taken.
    Full,
}

/// The order budget: orders running, when orders started in the last hour, and the names
/// waiting, in the order they were asked for. Pure bookkeeping: time comes in as arguments.
#[derive(Debug)]
struct Budget {
    per_hour: usize,
    running: HashSet<String>,
    started: VecDeque<Instant>,
    waiting: VecDeque<String>,
    /// Whether names waiting was logged since the queue was last empty.
    told: bool,
}

impl Budget {
    fn new(per_hour: u32) -> Self {
        Self {
            per_hour: usize::try_from(per_hour).unwrap_or(usize::MAX).max(1),
            running: HashSet::new(),
            started: VecDeque::new(),
            waiting: VecDeque::new(),
            told: false,
        }
    }

    /// Puts `name` at the end of the queue, unless it is running or waiting already.
    fn ask(&mut self, name: &str) -> Asked {
        if self.running.contains(name) || self.waiting.iter().any(|n| n == name) {
            Asked::Known
        } else if self.waiting.len() >= QUEUE_LIMIT {
            Asked::Full
        } else {
            self.waiting.push_back(name.to_owned());
            Asked::Queued
        }
    }

    /// The names whose order may start at `now`, taken off the queue and counted as started.
    fn next(&mut self, now: Instant) -> Vec<String> {
        while self.started.front().is_some_and(|t| now.saturating_duration_since(*t) >= HOUR) {
            self.started.pop_front();
        }
        let mut go = Vec::new();
        while self.running.len() < MAX_ORDERS_IN_FLIGHT && self.started.len() < self.per_hour {
            let Some(name) = self.waiting.pop_front() else { break };
            self.running.insert(name.clone());
            self.started.push_back(now);
            go.push(name);
        }
        if self.waiting.is_empty() {
            self.told = false;
        }
        go
    }

    /// An order ended, well or not.
    fn finished(&mut self, name: &str) {
        self.running.remove(name);
    }

    /// True the first time it is asked while names wait, then not until the queue emptied.
    fn tell_waiting(&mut self) -> bool {
        let tell = !self.waiting.is_empty() && !self.told;
        self.told |= tell;
        tell
    }
}

impl Acme {
    /// Loads the certificates obtained earlier from `DATA/acme/` into `store`.
    pub fn new(
        settings: AcmeSettings,
        data_dir: &Path,
        store: Arc<CertStore>,
        challenges: Challenges,
    ) -> Arc<Self> {
        let settings_orders_per_hour = settings.orders_per_hour;
        let acme = Arc::new(Self {
            settings,
            dir: data_dir.join("acme"),
            store,
            challenges,
            account: OnceCell::new(),
            state: Mutex::new(AcmeState {
                budget: Budget::new(settings_orders_per_hour),
                failed: HashMap::new(),
            }),
        });
        acme.load_issued();
        acme
    }

    fn cert_path(&self, name: &str) -> (PathBuf, PathBuf) {
        let certs = self.dir.join("certs");
        (certs.join(format!("{name}.pem")), certs.join(format!("{name}-key.pem")))
    }

    fn load_issued(&self) {
        let Ok(entries) = fs::read_dir(self.dir.join("certs")) else { return };
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            let Some(name) = file.strip_suffix(".pem").filter(|n| !n.ends_with("-key")) else {
                continue;
            };
            let (cert, key) = self.cert_path(name);
            match (fs::read(&cert), fs::read(&key)) {
                (Ok(c), Ok(k)) => match self.store.set_acme(name, &c, &k) {
                    Ok(()) => info!(name, "certificate from ACME loaded"),
                    Err(e) => warn!(name, reason = %e, "stored ACME certificate refused"),
                },
                _ => warn!(name, "stored ACME certificate or key unreadable"),
            }
        }
    }

    /// Makes sure a certificate for `name` is, or will be, served: starts an order in the
    /// background unless one covers the name, an order is running, or the last one failed
    /// less than [`RETRY_AFTER`] ago.
    pub fn ensure(self: &Arc<Self>, name: &str) {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if self.store.covered(&name) {
            return;
        }
        self.start(name);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AcmeState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues an order for `name` and starts what the budget allows.
    fn start(self: &Arc<Self>, name: String) {
        let (go, tell, asked) = {
            let mut st = self.lock();
            if st.failed.get(&name).is_some_and(|t| t.elapsed() < RETRY_AFTER) {
                return;
            }
            let asked = st.budget.ask(&name);
            let go = st.budget.next(Instant::now());
            (go, st.budget.tell_waiting(), asked)
        };
        if tell {
            warn!(
                name,
                in_flight = MAX_ORDERS_IN_FLIGHT,
                per_hour = self.settings.orders_per_hour,
                queue_limit = QUEUE_LIMIT,
                "ACME order budget used up; names wait in a queue and get the fallback certificate \
                 until their turn (raise --acme-orders-per-hour if your CA allows more)"
            );
        }
        if asked == Asked::Full {
            debug!(name, "ACME queue full; the name is asked for again at its next bind");
        }
        for n in go {
            self.spawn_order(n);
        }
    }

    /// Starts the queued orders the budget allows now (as the hour's window moves on).
    fn pump(self: &Arc<Self>) {
        let go = {
            let mut st = self.lock();
            st.failed.retain(|_, t| t.elapsed() < RETRY_AFTER);
            st.budget.next(Instant::now())
        };
        for n in go {
            self.spawn_order(n);
        }
    }

    fn spawn_order(self: &Arc<Self>, name: String) {
        let this = self.clone();
        tokio::spawn(async move {
            info!(name, directory = %this.settings.directory, "ordering a certificate from ACME");
            let result = this.order(&name).await;
            {
                let mut st = this.lock();
                st.budget.finished(&name);
                match result {
                    Ok(()) => {
                        st.failed.remove(&name);
                        info!(name, "certificate from ACME installed");
                    }
                    Err(e) => {
                        st.failed.insert(name.clone(), Instant::now());
                        warn!(
                            name,
                            error = %crate::util::error_chain(&e),
                            retry_in_s = RETRY_AFTER.as_secs(),
                            "ACME order failed; serving the development certificate meanwhile"
                        );
                    }
                }
            }
            this.pump();
        });
    }

    /// Renews certificates past two thirds of their lifetime, checking every `every`, and starts
    /// queued orders as the budget allows, until `shutdown`.
    pub fn watch_renewals(self: &Arc<Self>, every: Duration, shutdown: CancellationToken) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            let mut pump = tokio::time::interval(PUMP_EVERY);
            loop {
                tokio::select! {
                    _ = tick.tick() => this.renew_due(SystemTime::now()),
                    _ = pump.tick() => this.pump(),
                    () = shutdown.cancelled() => return,
                }
            }
        });
    }

    fn renew_due(self: &Arc<Self>, now: SystemTime) {
        let Ok(entries) = fs::read_dir(self.dir.join("certs")) else { return };
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            let Some(name) = file.strip_suffix(".pem").filter(|n| !n.ends_with("-key")) else {
                continue;
            };
            let Ok(pem) = fs::read(entry.path()) else { continue };
            match renewal_due(&pem, now) {
                Some(true) => {
                    info!(name, "certificate from ACME is due for renewal");
                    self.start(name.to_owned());
                }
                Some(false) => {}
                None => debug!(name, "cannot read the validity of a stored ACME certificate"),
            }
        }
    }

    async fn account(&self) -> Result<&Account, AcmeError> {
        self.account
            .get_or_try_init(|| async {
                let builder = match &self.settings.directory_ca {
                    Some(ca) => Account::builder_with_root(ca)?,
                    None => Account::builder()?,
                };
                let path = self.dir.join("account.json");
                if let Ok(text) = fs::read_to_string(&path) {
                    let creds: AccountCredentials = serde_json::from_str(&text).map_err(|e| {
                        AcmeError::Order(format!(
                            "{}: {e}; delete it to register anew",
                            path.display()
                        ))
                    })?;
                    return Ok(builder.from_credentials(creds).await?);
                }
                let contact = format!("mailto:{}", self.settings.email);
                let (account, creds) = builder
                    .create(
                        &NewAccount {
                            contact: &[contact.as_str()],
                            terms_of_service_agreed: true,
                            only_return_existing: false,
                        },
                        self.settings.directory.clone(),
                        None,
                    )
                    .await?;
                let json = serde_json::to_string(&creds)
                    .map_err(|e| AcmeError::Order(format!("account credentials: {e}")))?;
                let io = |source| AcmeError::Io { path: path.clone(), source };
                fs::create_dir_all(&self.dir).map_err(io)?;
                write_private(&path, json.as_bytes()).map_err(io)?;
                info!(email = %self.settings.email, "ACME account registered");
                Ok(account)
            })
            .await
    }

    async fn order(&self, name: &str) -> Result<(), AcmeError> {
        let account = self.account().await?;
        let ids = [Identifier::Dns(name.to_owned())];
        let mut order = account.new_order(&NewOrder::new(&ids)).await?;
        let mut tokens = Vec::new();
        let result = async {
            let mut authorizations = order.authorizations();
            while let Some(authz) = authorizations.next().await {
                let mut authz = authz?;
                match authz.status {
                    AuthorizationStatus::Pending => {}
                    AuthorizationStatus::Valid => continue,
                    other => {
                        return Err(AcmeError::Order(format!("authorization is {other:?}")));
                    }
                }
                let mut challenge = authz.challenge(ChallengeType::Http01).ok_or_else(|| {
                    AcmeError::Order("the CA offers no http-01 challenge".to_owned())
                })?;
                let key_auth = challenge.key_authorization();
                self.challenges.put(&challenge.token, key_auth.as_str());
                tokens.push(challenge.token.clone());
                challenge.set_ready().await?;
            }
            let retry = RetryPolicy::new().timeout(Duration::from_secs(90));
            let status = order.poll_ready(&retry).await?;
            if status != OrderStatus::Ready {
                return Err(AcmeError::Order(format!(
                    "the order is {status:?}, not ready: did the CA reach http://{name}/.well-known/acme-challenge/ on port 80?"
                )));
            }
            let key_pem = order.finalize().await?;
            let chain_pem = order.poll_certificate(&retry).await?;
            Ok((chain_pem, key_pem))
        }
        .await;
        for t in &tokens {
            self.challenges.remove(t);
        }
        let (chain_pem, key_pem) = result?;
        self.store
            .set_acme(name, chain_pem.as_bytes(), key_pem.as_bytes())
            .map_err(AcmeError::Order)?;
        let (cert, key) = self.cert_path(name);
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| AcmeError::Io { path, source }
        };
        if let Some(dir) = cert.parent() {
            fs::create_dir_all(dir).map_err(io(dir))?;
        }
        let _ = fs::remove_file(&key);
        write_private(&key, key_pem.as_bytes()).map_err(io(&key))?;
        fs::write(&cert, chain_pem.as_bytes()).map_err(io(&cert))?;
        Ok(())
    }
}

/// Whether the first certificate of a PEM chain has passed two thirds of its validity at `now`;
/// `None` when its validity cannot be read.
pub fn renewal_due(pem: &[u8], now: SystemTime) -> Option<bool> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let der = CertificateDer::pem_slice_iter(pem).next()?.ok()?;
    let (not_before, not_after) = validity(&der)?;
    let now = now.duration_since(UNIX_EPOCH).ok()?.as_secs() as i64;
    let renew_at = not_before + (not_after - not_before) * 2 / 3;
    Some(now >= renew_at)
}

/// One DER element: tag, contents, and what follows it.
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// `notBefore` and `notAfter` of an X.509 certificate, in seconds since the Unix epoch.
fn validity(cert: &[u8]) -> Option<(i64, i64)> {
    let (0x30, cert, _) = der(cert)? else { return None };
    let (0x30, tbs, _) = der(cert)? else { return None };
    let mut rest = tbs;
    let (tag, _, after) = der(rest)?;
    if tag == 0xa0 {
        rest = after; // explicit version
    }
    let (_, _, rest) = der(rest)?; // serial number
    let (_, _, rest) = der(rest)?; // signature algorithm
    let (_, _, rest) = der(rest)?; // issuer
    let (0x30, validity, _) = der(rest)? else { return None };
    let (t1, v1, rest) = der(validity)?;
    let (t2, v2, _) = der(rest)?;
    Some((asn1_time(t1, v1)?, asn1_time(t2, v2)?))
}

/// UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime (`YYYYMMDDHHMMSSZ`) as Unix seconds.
fn asn1_time(tag: u8, v: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(v).ok()?.strip_suffix('Z')?;
    let (year, rest) = match tag {
        0x17 if s.len() == 12 => {
            let yy: i64 = s[..2].parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &s[2..])
        }
        0x18 if s.len() == 14 => (s[..4].parse().ok()?, &s[4..]),
        _ => return None,
    };
    let n = |i: usize| rest.get(i..i + 2)?.parse::<i64>().ok();
    let (month, day, hour, min, sec) = (n(0)?, n(2)?, n(4)?, n(6)?, n(8)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + min * 60 + sec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_days() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2026, 11, 28), 20_785);
        assert_eq!(asn1_time(0x17, b"700101000000Z"), Some(0));
        assert_eq!(asn1_time(0x18, b"20261128120000Z"), Some(20_785 * 86_400 + 12 * 3600));
        assert_eq!(asn1_time(0x17, b"701301000000Z"), None);
        assert_eq!(asn1_time(0x17, b"7001010000Z"), None);
    }

    #[test]
    fn renewal_after_two_thirds() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["a.example".into()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2026, 1, 1);
        params.not_after = rcgen::date_time_ymd(2026, 4, 1); // 90 days
        let pem = params.self_signed(&key).unwrap().pem();
        let at =
            |y, m, d| UNIX_EPOCH + Duration::from_secs((days_from_civil(y, m, d) * 86_400) as u64);
        assert_eq!(renewal_due(pem.as_bytes(), at(2026, 2, 1)), Some(false));
        assert_eq!(renewal_due(pem.as_bytes(), at(2026, 3, 10)), Some(true));
        assert_eq!(renewal_due(b"not a certificate", at(2026, 3, 1)), None);
        // A year past 2049 is a GeneralizedTime.
        let mut params = rcgen::CertificateParams::new(vec!["a.example".into()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2040, 1, 1);
        params.not_after = rcgen::date_time_ymd(2070, 1, 1);
        let pem = params.self_signed(&key).unwrap().pem();
        assert_eq!(renewal_due(pem.as_bytes(), at(2041, 1, 1)), Some(false));
        assert_eq!(renewal_due(pem.as_bytes(), at(2061, 1, 1)), Some(true));
    }

    #[test]
    fn truncated_der_is_refused() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["a.example".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = cert.der().to_vec();
        assert!(validity(&der).is_some());
        for cut in 0..der.len().min(200) {
            // Never a panic; a cut before the validity fields gives None.
            let _ = validity(&der[..cut]);
        }
        assert_eq!(validity(&der[..40]), None);
    }

    #[test]
    fn at_most_four_orders_run_at_once() {
        let mut b = Budget::new(50);
        let t0 = Instant::now();
        for i in 0..6 {
            assert_eq!(b.ask(&format!("n{i}.example")), Asked::Queued);
        }
        assert_eq!(b.next(t0), ["n0.example", "n1.example", "n2.example", "n3.example"]);
        assert!(b.tell_waiting(), "names wait: say it");
        assert!(!b.tell_waiting(), "said once");
        assert!(b.next(t0).is_empty(), "four are running");
        b.finished("n1.example");
        assert_eq!(b.next(t0), ["n4.example"]);
        b.finished("n0.example");
        assert_eq!(b.next(t0), ["n5.example"]);
        assert!(!b.tell_waiting(), "nothing waits");
    }

    #[test]
    fn the_hourly_budget_holds_names_until_the_window_moves() {
        let mut b = Budget::new(2);
        let t0 = Instant::now();
        for n in ["a", "b", "c"] {
            b.ask(n);
        }
        assert_eq!(b.next(t0), ["a", "b"]);
        b.finished("a");
        b.finished("b");
        assert!(b.next(t0 + Duration::from_secs(3599)).is_empty(), "budget spent for the hour");
        assert!(b.tell_waiting());
        assert_eq!(b.next(t0 + HOUR), ["c"]);
        // The queue emptied: the next time names wait, it is said again.
        b.ask("d");
        b.ask("e");
        assert_eq!(b.next(t0 + HOUR), ["d"]);
        assert!(b.tell_waiting());
    }

    #[test]
    fn names_are_queued_once_and_the_queue_is_bounded() {
        let mut b = Budget::new(1);
        let t0 = Instant::now();
        b.ask("running");
        assert_eq!(b.next(t0), ["running"]);
        assert_eq!(b.ask("running"), Asked::Known);
        assert_eq!(b.ask("w"), Asked::Queued);
        assert_eq!(b.ask("w"), Asked::Known);
        for i in 1..QUEUE_LIMIT {
            assert_eq!(b.ask(&format!("w{i}")), Asked::Queued);
        }
        assert_eq!(b.ask("one-too-many"), Asked::Full);
        assert_eq!(b.waiting.len(), QUEUE_LIMIT);
    }

    #[test]
    fn challenges_are_served_until_removed() {
        let c = Challenges::default();
        c.put("tok", "tok.thumb");
        assert_eq!(c.get("tok").as_deref(), Some("tok.thumb"));
        c.remove("tok");
        assert_eq!(c.get("tok"), None);
    }
}
