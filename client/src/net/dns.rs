//! The service-discovery DNS: one hickory-server on each network's gateway, port 53, UDP and
//! TCP.
//!
//! In network N a query is answered from N's names only:
//! - `NAME` and `NAME.N` (endpoints, aliases, services): A records; an unknown one is NXDOMAIN;
//! - `NAME.M` for another warren network M: NXDOMAIN (networks do not see each other);
//! - PTR for an address of N: `ENDPOINT.N`;
//! - anything else goes to the upstream resolvers, as the client sent it, over the transport
//!   it used.
//!
//! A `dnsrr` service answers every endpoint address in a new order each time; a `vip` service
//! answers its one virtual address.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_proto::op::{Message, Metadata, ResponseCode};
use hickory_proto::rr::rdata::{A, PTR};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_server::net::runtime::Time;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use rand::seq::SliceRandom;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// One name's answer.
#[derive(Clone, Debug, PartialEq)]
pub enum Answer {
    /// These addresses, in this order.
    Fixed(Vec<Ipv4Addr>),
    /// These addresses, shuffled for each answer.
    Shuffled(Vec<Ipv4Addr>),
}

/// The names of one network.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Zone {
    /// Lower-case single labels.
    pub names: HashMap<String, Answer>,
    /// Endpoint addresses to their names (`NAME.NETWORK`).
    pub ptr: HashMap<Ipv4Addr, String>,
}

/// Every network's names; the manager replaces them on each change.
pub type Zones = Arc<RwLock<HashMap<String, Zone>>>;

/// The handler of one network's server.
#[derive(Debug)]
struct Handler {
    network: String,
    /// Only clients in this subnet are answered (other networks get REFUSED).
    subnet: ipnet::Ipv4Net,
    zones: Zones,
    upstreams: Arc<Vec<SocketAddr>>,
    ttl: u32,
}

enum Decision {
    Local(Result<Vec<Record>, ResponseCode>),
    Forward,
}

fn name_of(s: &str) -> Option<Name> {
    Name::from_ascii(s).ok().map(|mut n| {
        n.set_fqdn(true);
        n
    })
}

fn reverse_ip(qname: &str) -> Option<Ipv4Addr> {
    let rest = qname.strip_suffix(".in-addr.arpa")?;
    let mut o: Vec<u8> = rest.split('.').map(str::parse).collect::<Result<_, _>>().ok()?;
    if o.len() != 4 {
        return None;
    }
    o.reverse();
    Some(Ipv4Addr::new(o[0], o[1], o[2], o[3]))
}

impl Handler {
    fn decide(&self, qname: &Name, qtype: RecordType) -> Decision {
        let text = qname.to_ascii().to_ascii_lowercase();
        let text = text.trim_end_matches('.');
        let zones = self.zones.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(zone) = zones.get(&self.network) else { return Decision::Forward };
        if let Some(ip) = reverse_ip(text) {
            return match zone.ptr.get(&ip) {
                Some(target) if qtype == RecordType::PTR || qtype == RecordType::ANY => {
                    let rec = name_of(target)
                        .map(|t| Record::from_rdata(qname.clone(), self.ttl, RData::PTR(PTR(t))));
                    Decision::Local(Ok(rec.into_iter().collect()))
                }
                Some(_) => Decision::Local(Ok(Vec::new())),
                None => Decision::Forward,
            };
        }
        let labels: Vec<&str> = text.split('.').collect();
        let local = match labels.as_slice() {
            [""] => None,
            [one] => Some(*one),
            [one, net] if *net == self.network => Some(*one),
            [_, net] if zones.contains_key(*net) => {
                return Decision::Local(Err(ResponseCode::NXDomain));
            }
            _ => None,
        };
        let Some(label) = local else { return Decision::Forward };
        let Some(answer) = zone.names.get(label) else {
            return Decision::Local(Err(ResponseCode::NXDomain));
        };
        if qtype != RecordType::A && qtype != RecordType::ANY {
            return Decision::Local(Ok(Vec::new()));
        }
        let mut ips = match answer {
            Answer::Fixed(v) | Answer::Shuffled(v) => v.clone(),
        };
        if matches!(answer, Answer::Shuffled(_)) {
            ips.shuffle(&mut rand::rng());
        }
        Decision::Local(Ok(ips
            .into_iter()
            .map(|ip| Record::from_rdata(qname.clone(), self.ttl, RData::A(A(ip))))
            .collect()))
    }

    async fn forward(&self, raw: &[u8], tcp: bool) -> Option<Message> {
        for up in self.upstreams.iter() {
            let got = if tcp { ask_tcp(*up, raw).await } else { ask_udp(*up, raw).await };
            match got {
                Ok(bytes) => match Message::from_vec(&bytes) {
                    Ok(m) => return Some(m),
                    Err(e) => tracing::debug!("upstream {up} sent a bad answer: {e}"),
                },
                Err(e) => tracing::debug!("upstream {up}: {e}"),
            }
        }
        None
    }
}

async fn ask_udp(up: SocketAddr, raw: &[u8]) -> std::io::Result<Vec<u8>> {
    let bind: SocketAddr = if up.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
        .parse()
        .map_err(|_| std::io::Error::other("bind address"))?;
    let sock = UdpSocket::bind(bind).await?;
    sock.connect(up).await?;
    sock.send(raw).await?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(2), sock.recv(&mut buf))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in 2 s"))??;
    buf.truncate(n);
    Ok(buf)
}

async fn ask_tcp(up: SocketAddr, raw: &[u8]) -> std::io::Result<Vec<u8>> {
    let work = async {
        let mut s = TcpStream::connect(up).await?;
        let len = u16::try_from(raw.len()).map_err(|_| std::io::Error::other("query too long"))?;
        s.write_all(&len.to_be_bytes()).await?;
        s.write_all(raw).await?;
        let mut l = [0u8; 2];
        s.read_exact(&mut l).await?;
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(l))];
        s.read_exact(&mut buf).await?;
        Ok(buf)
    };
    tokio::time::timeout(Duration::from_secs(4), work)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in 4 s"))?
}

/// What is reported for a response that could not be sent.
fn unsent(request: &Request, code: ResponseCode) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.response_code = code;
    ResponseInfo::from(hickory_proto::op::Header { metadata, counts: Default::default() })
}

/// Answers `request` with `code` and no records.
async fn send_error<R: ResponseHandler>(
    request: &Request,
    mut response_handle: R,
    code: ResponseCode,
) -> ResponseInfo {
    let resp =
        MessageResponseBuilder::from_message_request(request).error_msg(&request.metadata, code);
    response_handle.send_response(resp).await.unwrap_or_else(|_| unsent(request, code))
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let inside = match request.src().ip() {
            IpAddr::V4(ip) => self.subnet.contains(&ip),
            IpAddr::V6(_) => false,
        };
        if !inside {
            return send_error(request, response_handle, ResponseCode::Refused).await;
        }
        let Ok(info) = request.request_info() else {
            return send_error(request, response_handle, ResponseCode::FormErr).await;
        };
        let qname: Name = info.query.name().into();
        let qtype = info.query.query_type();
        let mut meta = Metadata::response_from_request(&request.metadata);
        meta.recursion_available = true;
        match self.decide(&qname, qtype) {
            Decision::Local(result) => {
                meta.authoritative = true;
                let records = match result {
                    Ok(r) => r,
                    Err(code) => {
                        meta.response_code = code;
                        Vec::new()
                    }
                };
                let resp = MessageResponseBuilder::from_message_request(request).build(
                    meta,
                    records.iter(),
                    [],
                    [],
                    [],
                );
                response_handle
                    .send_response(resp)
                    .await
                    .unwrap_or_else(|_| unsent(request, ResponseCode::ServFail))
            }
            Decision::Forward => {
                let tcp = request.protocol() == Protocol::Tcp;
                match self.forward(request.as_slice(), tcp).await {
                    Some(up) => {
                        meta.response_code = up.metadata.response_code;
                        meta.truncation = up.metadata.truncation;
                        let resp = MessageResponseBuilder::from_message_request(request).build(
                            meta,
                            up.answers.iter(),
                            up.authorities.iter(),
                            [],
                            up.additionals.iter(),
                        );
                        response_handle
                            .send_response(resp)
                            .await
                            .unwrap_or_else(|_| unsent(request, ResponseCode::ServFail))
                    }
                    None => send_error(request, response_handle, ResponseCode::ServFail).await,
                }
            }
        }
    }
}

/// A running DNS server for one network; dropping it stops it.
#[derive(Debug)]
pub struct DnsServer {
    task: tokio::task::JoinHandle<()>,
}

impl DnsServer {
    /// Whether it stopped (and should be started again).
    pub fn finished(&self) -> bool {
        self.task.is_finished()
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts network `network`'s server on `addr`:53 (UDP and TCP).
pub async fn serve(
    network: &str,
    addr: Ipv4Addr,
    subnet: ipnet::Ipv4Net,
    zones: Zones,
    upstreams: Arc<Vec<SocketAddr>>,
    ttl: u32,
) -> std::io::Result<DnsServer> {
    let sa = SocketAddr::new(IpAddr::V4(addr), 53);
    let udp = UdpSocket::bind(sa).await?;
    let tcp = TcpListener::bind(sa).await?;
    let handler = Handler { network: network.to_owned(), subnet, zones, upstreams, ttl };
    let mut server = hickory_server::Server::new(handler);
    server.register_socket(udp);
    server.register_listener(tcp, Duration::from_secs(10), 64 * 1024);
    let net = network.to_owned();
    let task = tokio::spawn(async move {
        if let Err(e) = server.block_until_done().await {
            tracing::warn!("DNS server of network {net} stopped: {e}");
        }
    });
    Ok(DnsServer { task })
}

/// The upstream resolvers of `/etc/resolv.conf` (port 53), in order.
pub fn system_upstreams() -> Vec<SocketAddr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// Parses `IP` or `IP:PORT` (`[V6]:PORT`).
pub fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    s.parse::<SocketAddr>().map_err(|_| format!("{s:?} is not IP or IP:PORT"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handler() -> Handler {
        let mut zones = HashMap::new();
        let mut web = Zone::default();
        web.names.insert("api".into(), Answer::Fixed(vec![Ipv4Addr::new(10, 0, 0, 2)]));
        web.names.insert(
            "shop".into(),
            Answer::Shuffled(vec![Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 3)]),
        );
        web.ptr.insert(Ipv4Addr::new(10, 0, 0, 2), "api.web".into());
        zones.insert("web".to_owned(), web);
        zones.insert("db".to_owned(), Zone::default());
        Handler {
            network: "web".into(),
            subnet: "10.0.0.0/24".parse().expect("subnet"),
            zones: Arc::new(RwLock::new(zones)),
            upstreams: Arc::new(Vec::new()),
            ttl: 7,
        }
    }

    fn local(d: Decision) -> Result<Vec<Record>, ResponseCode> {
        match d {
            Decision::Local(r) => r,
            Decision::Forward => panic!("forwarded"),
        }
    }

    #[test]
    fn answers_scoped_names_and_forwards_the_rest() {
        let h = handler();
        let n = |s: &str| Name::from_ascii(s).expect("name");
        for q in ["api.", "API.web.", "api.web"] {
            let r = local(h.decide(&n(q), RecordType::A)).expect("found");
            assert_eq!(r.len(), 1, "{q}");
            assert_eq!(r[0].ttl, 7);
        }
        assert_eq!(local(h.decide(&n("nope."), RecordType::A)).err(), Some(ResponseCode::NXDomain));
        assert_eq!(
            local(h.decide(&n("api.db."), RecordType::A)).err(),
            Some(ResponseCode::NXDomain)
        );
        assert!(local(h.decide(&n("api."), RecordType::AAAA)).expect("nodata").is_empty());
        assert!(matches!(h.decide(&n("example.com."), RecordType::A), Decision::Forward));
        let ptr = local(h.decide(&n("2.0.0.10.in-addr.arpa."), RecordType::PTR)).expect("ptr");
        assert_eq!(ptr.len(), 1);
        assert!(matches!(
            h.decide(&n("9.9.9.10.in-addr.arpa."), RecordType::PTR),
            Decision::Forward
        ));
        assert_eq!(local(h.decide(&n("shop."), RecordType::A)).expect("rr").len(), 2);
    }

    #[test]
    fn upstreams_parse() {
        assert_eq!(parse_upstream("10.0.0.1").expect("ip").port(), 53);
        assert_eq!(parse_upstream("10.0.0.1:5353").expect("ip").port(), 5353);
        assert!(parse_upstream("resolver").is_err());
    }
}
