//! Admission control for newcomers: how many registrations and logins one
//! client address, and the server as a whole, may start.
//!
//! Both limits are governor's GCRA rate limiters. A refusal costs a few
//! microseconds and tells the client exactly when its next attempt would be
//! allowed. Behind these limits the password-hashing [`Gate`](crate::load::Gate)
//! still refuses work the machine cannot finish in time, so a global limit is
//! optional: by default the real capacity, measured, sets the pace.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr},
    num::NonZeroU32,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use governor::{
    Quota, RateLimiter,
    clock::{Clock, DefaultClock},
    state::keyed::DefaultKeyedStateStore,
};

use crate::{
    error::Result,
    load::{ShedReason, WorkClass},
};

/// Allowances for one class of newcomer request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimits {
    /// Sustained attempts per minute from one client address (0: no limit).
    pub per_address_per_minute: u32,
    /// Attempts one address may make at once before the sustained rate applies.
    pub per_address_burst: u32,
    /// Sustained attempts per second for the whole server (0: no fixed limit).
    pub global_per_second: u32,
    /// Attempts the whole server may take at once before the sustained rate applies.
    pub global_burst: u32,
}

type KeyedLimiter = RateLimiter<IpAddr, DefaultKeyedStateStore<IpAddr>, DefaultClock>;
type DirectLimiter = RateLimiter<governor::state::NotKeyed, governor::state::InMemoryState, DefaultClock>;

/// Per-address and global rate limits for one class (registration or login).
pub struct Admission {
    class: WorkClass,
    limiters: RwLock<Limiters>,
    clock: DefaultClock,
    checks: AtomicU64,
}

/// The limiters for one set of [`RateLimits`] and one share; replaced whole
/// when either changes.
struct Limiters {
    /// As configured, for the whole server (every node of a cluster).
    limits: RateLimits,
    /// How many nodes share the limits; this node enforces its part.
    share: u32,
    per_address: Option<KeyedLimiter>,
    global: Option<DirectLimiter>,
}

impl RateLimits {
    /// One node's part of these limits when `nodes` nodes share them, each
    /// serving about as many of every client's requests (a balancer that
    /// spreads requests: round-robin, least connections). Every allowance
    /// is rounded up, so the cluster admits at least what is configured and
    /// at most `nodes - 1` attempts more; no limit stays no limit.
    pub fn share_of(self, nodes: u32) -> Self {
        let part = |n: u32| if n == 0 { 0 } else { n.div_ceil(nodes.max(1)) };
        Self {
            per_address_per_minute: part(self.per_address_per_minute),
            per_address_burst: part(self.per_address_burst),
            global_per_second: part(self.global_per_second),
            global_burst: part(self.global_burst),
        }
    }
}

impl Limiters {
    fn new(configured: RateLimits, share: u32) -> Self {
        let limits = configured.share_of(share);
        let per_address = (limits.per_address_per_minute > 0).then(|| {
            RateLimiter::keyed(Quota::per_minute(nonzero(limits.per_address_per_minute)).allow_burst(nonzero(limits.per_address_burst)))
        });
        let global = (limits.global_per_second > 0)
            .then(|| RateLimiter::direct(Quota::per_second(nonzero(limits.global_per_second)).allow_burst(nonzero(limits.global_burst))));
        Self {
            limits: configured,
            share,
            per_address,
            global,
        }
    }
}

/// How many checks pass between sweeps of addresses whose allowance is full
/// again, so a flood from many addresses does not keep their state forever.
const SWEEP_EVERY: u64 = 4096;

fn nonzero(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
}

/// The key a client address is limited under. An IPv6 client controls its
/// whole /64, so the /64 is one key; IPv4-mapped addresses count as IPv4.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Things held at once per client address (IPv6 by /64): connections,
/// downloads. A client may hold at most `max` (0: no limit), except the
/// `unlimited` addresses (a reverse proxy speaks for every client it
/// serves); what it holds is given back when its [`AddressSlot`] drops.
pub struct AddressSlots {
    max: usize,
    unlimited: Vec<IpAddr>,
    in_use: Mutex<HashMap<IpAddr, usize>>,
}

/// One thing held by one address; see [`AddressSlots`].
pub struct AddressSlot {
    slots: Arc<AddressSlots>,
    address: IpAddr,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut in_use = self.slots.in_use.lock().expect("address slots");
        if let Some(n) = in_use.get_mut(&self.address) {
            *n -= 1;
            if *n == 0 {
                in_use.remove(&self.address);
            }
        }
    }
}

impl AddressSlots {
    pub fn new(max: usize, unlimited: &[IpAddr]) -> Arc<Self> {
        Arc::new(Self {
            max,
            unlimited: unlimited.iter().map(|a| address_key(*a)).collect(),
            in_use: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for `client`, or `None` when it holds all of its own.
    pub fn acquire(self: &Arc<Self>, client: IpAddr) -> Option<AddressSlot> {
        let address = address_key(client);
        let mut in_use = self.in_use.lock().expect("address slots");
        let n = in_use.entry(address).or_insert(0);
        if self.max > 0 && *n >= self.max && !self.unlimited.contains(&address) {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            slots: self.clone(),
            address,
        })
    }

    /// How many slots `client`'s address holds now.
    pub fn in_use(&self, client: IpAddr) -> usize {
        self.in_use
            .lock()
            .expect("address slots")
            .get(&address_key(client))
            .copied()
            .unwrap_or(0)
    }
}

impl Admission {
    pub fn new(class: WorkClass, limits: RateLimits) -> Self {
        Self {
            class,
            limiters: RwLock::new(Limiters::new(limits, 1)),
            clock: DefaultClock::default(),
            checks: AtomicU64::new(0),
        }
    }

    /// Replaces the limits (a configuration reload). Unchanged limits keep
    /// their state; changed ones start with every allowance full.
    pub fn set_limits(&self, limits: RateLimits) {
        let mut current = self.limiters.write().expect("admission limiters");
        if current.limits != limits {
            *current = Limiters::new(limits, current.share);
        }
    }

    /// Makes this node enforce its part of the limits shared by `nodes`
    /// nodes (see [`RateLimits::share_of`]); a reload keeps the share. A
    /// changed share starts with every allowance full.
    pub fn set_share(&self, nodes: u32) {
        let nodes = nodes.max(1);
        let mut current = self.limiters.write().expect("admission limiters");
        if current.share != nodes {
            *current = Limiters::new(current.limits, nodes);
        }
    }

    /// The limits as configured, for the whole server.
    pub fn limits(&self) -> RateLimits {
        self.limiters.read().expect("admission limiters").limits
    }

    /// How many nodes share the limits.
    pub fn share(&self) -> u32 {
        self.limiters.read().expect("admission limiters").share
    }

    /// Admits one attempt from `client`, or refuses it with the time until
    /// the next attempt would be allowed.
    pub fn check(&self, client: IpAddr) -> Result<()> {
        let limiters = self.limiters.read().expect("admission limiters");
        if let Some(limiter) = &limiters.per_address {
            if self.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
                limiter.retain_recent();
                limiter.shrink_to_fit();
            }
            if let Err(not_until) = limiter.check_key(&address_key(client)) {
                return Err(self.refuse(ShedReason::AddressRate, not_until.wait_time_from(self.clock.now())));
            }
        }
        if let Some(limiter) = &limiters.global
            && let Err(not_until) = limiter.check()
        {
            return Err(self.refuse(ShedReason::GlobalRate, not_until.wait_time_from(self.clock.now())));
        }
        Ok(())
    }

    fn refuse(&self, reason: ShedReason, wait: Duration) -> crate::Error {
        // Round up: a client that comes back after exactly this long is admitted.
        self.class.shed(reason, wait + Duration::from_millis(1))
    }

    /// Addresses currently tracked.
    #[cfg(test)]
    fn tracked_addresses(&self) -> usize {
        self.limiters
            .read()
            .expect("admission limiters")
            .per_address
            .as_ref()
            .map_or(0, |l| l.len())
    }
}

/// The admission limits in front of account creation and sign-in.
pub struct NewcomerAdmission {
    pub register: Admission,
    pub login: Admission,
}

impl NewcomerAdmission {
    /// No limits at all (tests of other things).
    pub fn unlimited(metrics: &crate::load::LoadMetrics) -> Self {
        let none = RateLimits {
            per_address_per_minute: 0,
            per_address_burst: 0,
            global_per_second: 0,
            global_burst: 0,
        };
        Self {
            register: Admission::new(metrics.class("register"), none),
            login: Admission::new(metrics.class("login"), none),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_holds_at_most_its_slots_and_gets_them_back() {
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let slots = AddressSlots::new(2, &[proxy]);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "2001:db8::1".parse().unwrap();
        let b_neighbour: IpAddr = "2001:db8::2".parse().unwrap();
        let first = slots.acquire(a).unwrap();
        let _second = slots.acquire(a).unwrap();
        assert!(slots.acquire(a).is_none(), "a third is refused");
        let _v6 = slots.acquire(b).unwrap();
        let _same_64 = slots.acquire(b_neighbour).unwrap();
        assert!(slots.acquire(b).is_none(), "a /64 is one address");
        drop(first);
        assert_eq!(slots.in_use(a), 1);
        assert!(slots.acquire(a).is_some(), "a slot given back can be taken again");
        let proxied: Vec<_> = (0..100).map(|_| slots.acquire(proxy).unwrap()).collect();
        assert_eq!(slots.in_use(proxy), proxied.len(), "an unlimited address is counted, never refused");
        let unlimited = AddressSlots::new(0, &[]);
        let held: Vec<_> = (0..100).map(|_| unlimited.acquire(a).unwrap()).collect();
        assert_eq!(unlimited.in_use(a), held.len());
    }
    use crate::{Error, load::LoadMetrics};

    fn limits(per_minute: u32, burst: u32, global: u32, global_burst: u32) -> RateLimits {
        RateLimits {
            per_address_per_minute: per_minute,
            per_address_burst: burst,
            global_per_second: global,
            global_burst,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn one_address_gets_its_burst_then_an_honest_wait() {
        let m = LoadMetrics::default();
        let a = Admission::new(m.class("register"), limits(6, 3, 0, 0));
        for _ in 0..3 {
            a.check(ip("192.0.2.1")).unwrap();
        }
        match a.check(ip("192.0.2.1")) {
            // 6 a minute: one every 10 s.
            Err(Error::LimitExceeded { retry_after_ms }) => assert!((9_000..=10_001).contains(&retry_after_ms), "{retry_after_ms}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        // Another address is not affected.
        a.check(ip("192.0.2.2")).unwrap();
        assert_eq!(m.shed_total("register"), 1);
    }

    #[test]
    fn new_limits_apply_at_once_and_unchanged_ones_keep_their_state() {
        let m = LoadMetrics::default();
        let a = Admission::new(m.class("register"), limits(6, 1, 0, 0));
        a.check(ip("192.0.2.1")).unwrap();
        assert!(a.check(ip("192.0.2.1")).is_err());
        a.set_limits(limits(6, 1, 0, 0));
        assert!(a.check(ip("192.0.2.1")).is_err(), "the same limits keep what was used");
        a.set_limits(limits(6, 3, 0, 0));
        assert_eq!(a.limits().per_address_burst, 3);
        for _ in 0..3 {
            a.check(ip("192.0.2.1")).unwrap();
        }
        assert!(a.check(ip("192.0.2.1")).is_err());
        a.set_limits(limits(0, 0, 0, 0));
        for _ in 0..100 {
            a.check(ip("192.0.2.1")).unwrap();
        }
    }

    #[test]
    fn a_share_is_each_nodes_part_rounded_up_and_a_reload_keeps_it() {
        assert_eq!(limits(6, 3, 10, 0).share_of(2), limits(3, 2, 5, 0));
        assert_eq!(limits(1, 1, 0, 0).share_of(3), limits(1, 1, 0, 0), "a limit never becomes no limit");
        assert_eq!(limits(6, 3, 10, 4).share_of(0), limits(6, 3, 10, 4));

        let m = LoadMetrics::default();
        let a = Admission::new(m.class("login"), limits(60, 4, 0, 0));
        a.set_share(2);
        for _ in 0..2 {
            a.check(ip("192.0.2.1")).unwrap();
        }
        assert!(a.check(ip("192.0.2.1")).is_err(), "half the burst on each of two nodes");
        a.set_limits(limits(60, 6, 0, 0));
        assert_eq!(
            (a.share(), a.limits().per_address_burst),
            (2, 6),
            "a reload keeps the share, limits are as configured"
        );
        for _ in 0..3 {
            a.check(ip("192.0.2.1")).unwrap();
        }
        assert!(a.check(ip("192.0.2.1")).is_err());
        a.set_share(1);
        for _ in 0..6 {
            a.check(ip("192.0.2.1")).unwrap();
        }
        assert!(a.check(ip("192.0.2.1")).is_err(), "alone again, the whole burst");
    }

    #[test]
    fn an_ipv6_client_is_limited_by_its_64() {
        let m = LoadMetrics::default();
        let a = Admission::new(m.class("login"), limits(1, 1, 0, 0));
        a.check(ip("2001:db8:1:2::1")).unwrap();
        assert!(a.check(ip("2001:db8:1:2:ffff::9")).is_err(), "same /64");
        a.check(ip("2001:db8:1:3::1")).unwrap();
        assert_eq!(address_key(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
    }

    #[test]
    fn the_global_limit_holds_across_addresses() {
        let m = LoadMetrics::default();
        let a = Admission::new(m.class("register"), limits(0, 0, 1, 2));
        a.check(ip("192.0.2.1")).unwrap();
        a.check(ip("192.0.2.2")).unwrap();
        match a.check(ip("192.0.2.3")) {
            Err(Error::LimitExceeded { retry_after_ms }) => assert!((900..=1_001).contains(&retry_after_ms), "{retry_after_ms}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(a.tracked_addresses(), 0, "no per-address limit configured");
    }

    #[test]
    fn zero_means_no_limit() {
        let m = LoadMetrics::default();
        let a = Admission::new(m.class("register"), limits(0, 0, 0, 0));
        for i in 0..10_000u32 {
            a.check(IpAddr::from(i.to_be_bytes())).unwrap();
        }
    }
}
