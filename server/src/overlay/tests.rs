use super::*;

fn label(s: &str) -> Label {
    Label::parse(s).expect("label")
}

fn overlays(grace: Duration) -> Overlays {
    let store = Arc::new(Store::open_in_memory().expect("store"));
    Overlays::load(store, crate::config::default_overlay_pool(), grace).expect("load")
}

fn account(n: u8) -> Account {
    Account::of(TokenId([n; 8]))
}

fn caller(acct: &Account, agent: &str, session: u64) -> Caller {
    Caller { account: acct.clone(), agent: AgentId::parse(agent).expect("agent"), session }
}

const A: Ipv4Addr = Ipv4Addr::new(192, 168, 99, 1);
const B: Ipv4Addr = Ipv4Addr::new(192, 168, 99, 2);

#[test]
fn create_picks_free_subnets_and_refuses_clashes() {
    let o = overlays(Duration::from_secs(1));
    let acct = account(1);
    let a = o.create(&acct, label("a"), None, None).expect("a");
    assert_eq!(a.subnet.to_string(), "10.214.0.0/24");
    assert_eq!(a.gateway, Ipv4Addr::new(10, 214, 0, 1));
    assert_eq!(a.mtu, DEFAULT_MTU);
    assert!(a.vni.get() >= FIRST_VNI);
    let b = o.create(&acct, label("b"), None, None).expect("b");
    assert_eq!(b.subnet.to_string(), "10.214.1.0/24");
    assert_ne!(a.vni, b.vni);
    let e = o.create(&acct, label("a"), None, None).expect_err("same name");
    assert!(matches!(e, OverlayError::Conflict(_)), "{e}");
    let wide = Subnet::new(Ipv4Addr::new(10, 214, 0, 0), 16).expect("subnet");
    let e = o.create(&acct, label("c"), Some(wide), None).expect_err("overlap");
    assert!(e.to_string().contains("overlaps overlay network"), "{e}");
    // Another account may reuse the name and the subnet.
    let other = o.create(&account(2), label("a"), None, None).expect("other account");
    assert_eq!(other.subnet, a.subnet);
    let e = o.create(&acct, label("d"), None, Some(100)).expect_err("mtu");
    assert!(matches!(e, OverlayError::Invalid(_)), "{e}");
}

#[test]
fn the_state_survives_a_reload() {
    let store = Arc::new(Store::open_in_memory().expect("store"));
    let acct = account(1);
    let o = Overlays::load(store.clone(), crate::config::default_overlay_pool(), Duration::ZERO)
        .expect("load");
    let def = o.create(&acct, label("net"), None, None).expect("create");
    let a = caller(&acct, "host-a", 1);
    o.join(&a, &def.name, A, &[]).expect("join");
    let ip = o.attach(&a, &def.name, label("api"), None, vec![]).expect("attach");
    drop(o);
    let o = Overlays::load(store, crate::config::default_overlay_pool(), Duration::ZERO)
        .expect("reload");
    let a = caller(&acct, "host-a", 2);
    o.join(&a, &def.name, A, &[label("api")]).expect("join again");
    assert_eq!(o.attach(&a, &def.name, label("api"), None, vec![]).expect("attach again"), ip);
    let b = caller(&acct, "host-b", 3);
    o.join(&b, &def.name, B, &[]).expect("join b");
    assert_ne!(o.attach(&b, &def.name, label("worker"), None, vec![]).expect("worker"), ip);
}

#[test]
fn addresses_and_names_are_global_and_unique() {
    let o = overlays(Duration::from_secs(1));
    let acct = account(1);
    let net = o.create(&acct, label("net"), None, None).expect("create").name;
    let a = caller(&acct, "host-a", 1);
    let b = caller(&acct, "host-b", 2);
    let (_, ha) = o.join(&a, &net, A, &[]).expect("join a");
    let (_, hb) = o.join(&b, &net, B, &[]).expect("join b");
    assert_eq!(ha, Ipv4Addr::new(10, 214, 0, 254), "hosts take addresses from the top");
    assert_eq!(hb, Ipv4Addr::new(10, 214, 0, 253));
    assert_eq!(o.join(&a, &net, A, &[]).expect("rejoin").1, ha, "a host keeps its address");
    let mut seen = HashSet::new();
    for i in 0..20 {
        let who = if i % 2 == 0 { &a } else { &b };
        let ip = o.attach(who, &net, label(&format!("ep{i}")), None, vec![]).expect("attach");
        assert!(seen.insert(ip), "{ip} handed out twice");
        assert!(ip != ha && ip != hb && ip != Ipv4Addr::new(10, 214, 0, 1));
    }
    let e = o.attach(&b, &net, label("ep0"), None, vec![]).expect_err("name of a's endpoint");
    assert!(e.to_string().contains("taken"), "{e}");
    let taken = *seen.iter().next().expect("one");
    let e = o.attach(&b, &net, label("x"), Some(taken), vec![]).expect_err("taken address");
    assert!(e.to_string().contains("is taken by endpoint"), "{e}");
    let e =
        o.attach(&b, &net, label("y"), Some(Ipv4Addr::new(10, 214, 0, 1)), vec![]).expect_err("gw");
    assert!(matches!(e, OverlayError::Invalid(_)), "{e}");
    let e = o.attach(&b, &net, label("z"), None, vec![label("ep1")]).expect_err("alias = name");
    assert!(e.to_string().contains("alias ep1"), "{e}");
    // A stranger of another session may not attach before joining.
    let e =
        o.attach(&caller(&acct, "host-c", 9), &net, label("w"), None, vec![]).expect_err("join");
    assert!(matches!(e, OverlayError::NotFound(_)), "{e}");
    // Deleting needs the endpoints gone.
    let e = o.delete(&acct, &net).expect_err("in use");
    assert!(e.to_string().contains("still has endpoints"), "{e}");
}

#[test]
fn join_releases_endpoints_the_agent_no_longer_has() {
    let o = overlays(Duration::from_secs(1));
    let acct = account(1);
    let net = o.create(&acct, label("net"), None, None).expect("create").name;
    let a = caller(&acct, "host-a", 1);
    o.join(&a, &net, A, &[]).expect("join");
    let keep = o.attach(&a, &net, label("keep"), None, vec![]).expect("keep");
    o.attach(&a, &net, label("lost"), None, vec![]).expect("lost");
    let svc = o
        .create_service(
            &acct,
            &net,
            label("svc"),
            ServiceMode::Dnsrr,
            vec![label("keep"), label("lost")],
        )
        .expect("service");
    assert_eq!(svc, None);
    let a2 = caller(&acct, "host-a", 2);
    o.join(&a2, &net, A, &[label("keep")]).expect("rejoin");
    let b = caller(&acct, "host-b", 3);
    o.join(&b, &net, B, &[]).expect("join b");
    assert!(o.attach(&b, &net, label("lost"), None, vec![]).is_ok(), "the name was released");
    assert_eq!(o.attach(&a2, &net, label("keep"), None, vec![]).expect("keep"), keep);
    let v = o.view(&acct, &b.agent);
    let Some(NetMessage::Service(s)) = v.get(&Key::Service(net.clone(), label("svc"))) else {
        panic!("no service in {v:?}");
    };
    assert_eq!(s.endpoints, vec![label("keep")], "the released endpoint left its service");
}

#[test]
fn views_diff_into_puts_and_gones_and_members_expire() {
    let o = overlays(Duration::from_millis(0));
    let acct = account(1);
    let net = o.create(&acct, label("net"), None, None).expect("create").name;
    let a = caller(&acct, "host-a", 1);
    let b = caller(&acct, "host-b", 2);
    let (_, ha) = o.join(&a, &net, A, &[]).expect("join a");
    o.join(&b, &net, B, &[]).expect("join b");
    let ip = o.attach(&a, &net, label("api"), None, vec![label("web")]).expect("attach");
    // A stranger of another account sees nothing of it.
    assert!(o.view(&account(2), &b.agent).is_empty());
    let seen_by_b = o.view(&acct, &b.agent);
    let msgs = diff(&View::new(), &seen_by_b);
    assert!(matches!(&msgs[0], NetMessage::Defined(d) if d.name == net), "{msgs:?}");
    assert!(msgs.contains(&NetMessage::Peer(overlay::Peer {
        network: net.clone(),
        addr: ha,
        agent: a.agent.clone(),
        vtep: A,
        online: true,
    })));
    assert!(msgs.contains(&NetMessage::Endpoint(overlay::Endpoint {
        network: net.clone(),
        name: label("api"),
        ip,
        peer: ha,
        aliases: vec![label("web")],
    })));
    // A does not hear about itself.
    let seen_by_a = o.view(&acct, &a.agent);
    assert!(!seen_by_a.keys().any(|k| matches!(k, Key::Endpoint(..))));
    assert!(!seen_by_a.keys().any(|k| matches!(k, Key::Peer(_, p) if *p == ha)));
    assert!(diff(&seen_by_b, &seen_by_b).is_empty());

    // A goes offline: B sees the peer change, then (grace 0) its withdrawal.
    o.session_ended(a.session);
    let offline = o.view(&acct, &b.agent);
    let msgs = diff(&seen_by_b, &offline);
    assert!(matches!(&msgs[..], [NetMessage::Peer(p)] if !p.online), "{msgs:?}");
    assert_eq!(o.expire(Instant::now()), 1);
    let withdrawn = o.view(&acct, &b.agent);
    let msgs = diff(&offline, &withdrawn);
    assert_eq!(
        msgs,
        vec![
            NetMessage::EndpointGone { network: net.clone(), name: label("api") },
            NetMessage::PeerGone { network: net.clone(), peer: ha },
        ]
    );
    // Its address stays claimed for it.
    let a2 = caller(&acct, "host-a", 5);
    o.join(&a2, &net, A, &[label("api")]).expect("back");
    assert_eq!(o.attach(&a2, &net, label("api"), None, vec![]).expect("again"), ip);
    o.detach(&a2, &net, &label("api")).expect("detach");
    o.delete(&acct, &net).expect("delete");
    let gone = diff(&o.view(&acct, &b.agent), &View::new());
    assert!(gone.is_empty(), "{gone:?}");
}

#[test]
fn frames_route_only_between_members_of_one_network() {
    let o = overlays(Duration::from_secs(1));
    let acct = account(1);
    let n1 = o.create(&acct, label("one"), None, None).expect("one");
    let n2 = o.create(&acct, label("two"), None, None).expect("two");
    let (_, ha) = o.join(&caller(&acct, "host-a", 1), &n1.name, A, &[]).expect("a");
    let (_, hb) = o.join(&caller(&acct, "host-b", 2), &n1.name, B, &[]).expect("b");
    o.join(&caller(&acct, "host-c", 3), &n2.name, B, &[]).expect("c");
    let data = o.data.read().expect("lock");
    assert_eq!(data.senders.get(&(n1.vni, 1)), Some(&ha));
    assert_eq!(data.routes[&n1.vni].get(&hb), Some(&2));
    assert_eq!(data.senders.get(&(n1.vni, 3)), None, "session 3 is not in network one");
    assert!(!data.routes[&n2.vni].contains_key(&ha));
    drop(data);
    // Forwarding a frame from a non-member only counts a drop.
    let mut d = Vec::new();
    FrameHeader { vni: n1.vni, peer: ha, frame: 1, part: 0, parts: 1 }.encode(&mut d);
    d.extend_from_slice(&[0u8; 60]);
    o.forward(3, Bytes::from(d));
    assert_eq!(o.counters.dropped.load(Ordering::Relaxed), 1);
    assert_eq!(o.counters.frames.load(Ordering::Relaxed), 0);
}
