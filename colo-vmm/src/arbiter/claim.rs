//! This replica's claim on its VM's key in etcd (`/colo/<vm>/holder` = the serving replica's
//! name), backed by a lease of `arbiter-ttl` that a thread renews every quarter of it.
//!
//! Beside it, without a lease so that it outlives every holder, `/colo/<vm>/pair` says whose
//! VM is up to date with what the clients have seen: `A` (A serves alone) or `A>B` (A serves
//! in COLO with B, whose VM has everything A released). Only those may take the key: a
//! secondary that fell behind — its primary went on alone — can never serve stale state, even
//! after the primary's lease expires. The holder changes the pair before its VM's output
//! depends on it: `A>B` once COLO has started, `A` before it releases anything alone.
//!
//! The claim counts as held only while the last renewal that succeeded was *sent* less than
//! `ttl − margin` ago: etcd may expire the lease `ttl` after it last heard a renewal, and a
//! replica must stop serving before that can happen. The same lease carries this replica's
//! standby registration (`/colo/<vm>/standby/<name>`), if any, so a standby that dies
//! disappears with its lease.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::etcd::{Compare, Etcd, EtcdError, Op};

/// How long before a lease could expire a replica stops counting on it: a quarter of the TTL,
/// at least 250 ms (the renewals' own round trips, and this side's scheduling).
fn margin(ttl: Duration) -> Duration {
    (ttl / 4).max(Duration::from_millis(250))
}

/// Whether etcd said the lease it was given does not exist (it expired).
fn lease_gone(e: &EtcdError) -> bool {
    matches!(e, EtcdError::Refused(why) if why.contains("lease not found"))
}

/// Whether the pair record lets `me` take the key once nobody holds it: it serves alone, or
/// it is either side of the pair (nothing recorded: a VM booted for the first time).
fn may_take(pair: Option<&str>, me: &str) -> bool {
    match pair.map(|p| p.split_once('>')) {
        None => true,
        Some(None) => pair == Some(me),
        Some(Some((holder, secondary))) => holder == me || secondary == me,
    }
}

/// What `query-colo-status` shows of the arbiter.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ArbiterStatus {
    /// etcd's endpoints.
    pub endpoints: Vec<String>,
    /// This replica's name.
    pub me: String,
    /// Who held the VM's key when last looked at.
    pub holder: Option<String>,
    /// The pair record when last looked at: `A` (A serves alone) or `A>B` (B may take over).
    pub pair: Option<String>,
    /// Whether this replica holds it now (and may serve).
    pub held: bool,
    /// Milliseconds this replica's lease has left for certain (sent time of the last renewal
    /// plus the TTL, minus now).
    pub lease_left_ms: Option<u64>,
    /// Milliseconds since the last renewal was sent.
    pub last_renewal_ms_ago: Option<u64>,
    /// Whether etcd answered the last request.
    pub reachable: bool,
    /// The last error.
    pub error: Option<String>,
    /// The lease's TTL.
    pub ttl_ms: u64,
}

#[derive(Debug, Default)]
struct State {
    lease: Option<i64>,
    held: bool,
    standby: Option<String>,
    renewed: Option<Instant>,
    holder: Option<String>,
    pair: Option<String>,
    reachable: bool,
    error: Option<String>,
}

/// The claim.
pub struct Claim {
    etcd: Etcd,
    vm: String,
    me: String,
    /// The TTL of this replica's lease, ms (changed by `arbiter-ttl`, see [`Claim::set_ttl`]).
    ttl_ms: AtomicU64,
    state: Mutex<State>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Claim {
    /// A claim of `me` on `vm`'s key, with leases of `ttl` (whole seconds at etcd: rounded up).
    pub fn new(etcd: Etcd, vm: &str, me: &str, ttl: Duration) -> Claim {
        let ttl_ms = AtomicU64::new(ttl.as_millis() as u64);
        Claim { etcd, vm: vm.to_string(), me: me.to_string(), ttl_ms, state: Mutex::new(State::default()) }
    }

    /// The VM's key.
    pub fn key(&self) -> String {
        format!("/colo/{}/holder", self.vm)
    }

    /// The pair record's key (see the module).
    fn pair_key(&self) -> String {
        format!("/colo/{}/pair", self.vm)
    }

    fn standby_key(&self) -> String {
        format!("/colo/{}/standby/{}", self.vm, self.me)
    }

    /// This replica's name.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// The lease's TTL.
    pub fn ttl(&self) -> Duration {
        Duration::from_millis(self.ttl_ms.load(Ordering::SeqCst))
    }

    fn ttl_secs(&self) -> i64 {
        self.ttl().as_millis().div_ceil(1000) as i64
    }

    /// Changes the TTL. A held key moves to a new lease of the new TTL first (one
    /// transaction), so this replica never counts on a longer lease than etcd keeps.
    pub fn set_ttl(&self, ttl: Duration) -> Result<(), EtcdError> {
        if ttl == self.ttl() {
            return Ok(());
        }
        let old = lock(&self.state).lease;
        if old.is_none() {
            self.ttl_ms.store(ttl.as_millis() as u64, Ordering::SeqCst);
            return Ok(());
        }
        let sent = Instant::now();
        let lease = self.noted(self.etcd.grant(ttl.as_millis().div_ceil(1000) as i64))?;
        let (held, standby) = {
            let s = lock(&self.state);
            (s.held, s.standby.clone())
        };
        if held && !self.noted(self.etcd.replace(&self.key(), &self.me, &self.me, lease))? {
            // Lost meanwhile: drop the new lease, keep the old state.
            let _ = self.etcd.revoke(lease);
            return Err(EtcdError::Refused("the key is no longer this replica's".into()));
        }
        if let Some(uri) = &standby {
            self.noted(self.etcd.put(&self.standby_key(), uri, lease))?;
        }
        {
            let mut s = lock(&self.state);
            s.lease = Some(lease);
            s.renewed = Some(sent);
        }
        self.ttl_ms.store(ttl.as_millis() as u64, Ordering::SeqCst);
        if let Some(old) = old {
            let _ = self.etcd.revoke(old);
        }
        Ok(())
    }

    /// Notes the outcome of a request to etcd.
    fn noted<T>(&self, r: Result<T, EtcdError>) -> Result<T, EtcdError> {
        let mut s = lock(&self.state);
        s.reachable = !matches!(r, Err(EtcdError::Unreachable(_)));
        s.error = r.as_ref().err().map(ToString::to_string);
        r
    }

    /// This replica's lease, granted on first use (or again after it expired).
    fn lease(&self) -> Result<i64, EtcdError> {
        if let Some(l) = lock(&self.state).lease {
            return Ok(l);
        }
        let sent = Instant::now();
        let l = self.noted(self.etcd.grant(self.ttl_secs()))?;
        let mut s = lock(&self.state);
        s.lease = Some(l);
        s.renewed = Some(sent);
        Ok(l)
    }

    /// Takes the VM's key if nobody holds it and the pair record allows (see the module);
    /// whether this replica holds it now. A secondary taking it becomes the one that serves
    /// alone; a primary (re)taking it keeps its pair.
    pub fn acquire(&self) -> Result<bool, EtcdError> {
        if self.holds() {
            return Ok(true);
        }
        let (key, pair_key) = (self.key(), self.pair_key());
        let pair = self.pair()?;
        if !may_take(pair.as_deref(), &self.me) {
            self.holder()?;
            return Ok(false);
        }
        let keep = pair.as_deref().is_some_and(|p| p.split_once('>').is_some_and(|(h, _)| h == self.me));
        let next = if keep { pair.clone().unwrap_or_default() } else { self.me.clone() };
        let pair_now = match &pair {
            Some(p) => Compare::Value(&pair_key, p),
            None => Compare::Absent(&pair_key),
        };
        let take = |lease: i64| {
            self.etcd.txn(
                &[Compare::Absent(&key), pair_now],
                &[Op::Put(&key, &self.me, lease), Op::Put(&pair_key, &next, 0)],
            )
        };
        let mut lease = self.lease()?;
        let created = match take(lease) {
            // The lease expired meanwhile: a new one, and once more.
            Err(e) if lease_gone(&e) => {
                lock(&self.state).lease = None;
                lease = self.lease()?;
                take(lease)
            }
            other => other,
        };
        let mut took = self.noted(created)?;
        if took {
            lock(&self.state).pair = Some(next);
        } else if let Some(kv) = self.noted(self.etcd.get(&key))? {
            // Ours already (a renewal raced, or a restart with the same name on our lease)?
            took = kv.value == self.me && kv.lease == lease;
            lock(&self.state).holder = Some(kv.value);
        }
        self.took(took);
        Ok(took)
    }

    /// Takes the VM's key from `dead`, a holder whose process is known to be gone (its
    /// checkpoint link ended with a reset or EOF), if this replica is its secondary in the pair
    /// record: at once, not after its lease expires. Whether this replica holds it now.
    pub fn take_from(&self, dead: &str) -> Result<bool, EtcdError> {
        let lease = self.lease()?;
        let (key, pair_key) = (self.key(), self.pair_key());
        let pair = format!("{dead}>{}", self.me);
        let took = self.noted(self.etcd.txn(
            &[Compare::Value(&key, dead), Compare::Value(&pair_key, &pair)],
            &[Op::Put(&key, &self.me, lease), Op::Put(&pair_key, &self.me, 0)],
        ))?;
        if !took {
            return self.acquire();
        }
        lock(&self.state).pair = Some(self.me.clone());
        self.took(true);
        Ok(true)
    }

    /// The holder records that it serves alone: no other replica's VM is up to date from now
    /// on. It must have done so before it releases anything alone. Whether it still held the
    /// key (else nothing changed).
    pub fn serve_alone(&self) -> Result<bool, EtcdError> {
        self.set_pair(self.me.clone())
    }

    /// The holder records that `secondary` has its VM's state (COLO started with it) and may
    /// take over. Whether it still held the key.
    pub fn protect_with(&self, secondary: &str) -> Result<bool, EtcdError> {
        self.set_pair(format!("{}>{secondary}", self.me))
    }

    fn set_pair(&self, pair: String) -> Result<bool, EtcdError> {
        let (key, pair_key) = (self.key(), self.pair_key());
        let done = self.noted(self.etcd.txn(&[Compare::Value(&key, &self.me)], &[Op::Put(&pair_key, &pair, 0)]))?;
        if done {
            lock(&self.state).pair = Some(pair);
        }
        Ok(done)
    }

    /// The pair record (asks etcd).
    pub fn pair(&self) -> Result<Option<String>, EtcdError> {
        let p = self.noted(self.etcd.get(&self.pair_key()))?.map(|kv| kv.value);
        lock(&self.state).pair = p.clone();
        Ok(p)
    }

    /// Whether this replica may still take the key once free (the pair record names it); a
    /// secondary for which this is false is out of date for good.
    pub fn eligible(&self) -> Result<bool, EtcdError> {
        Ok(may_take(self.pair()?.as_deref(), &self.me))
    }

    /// Notes a successful take. The lease's age is not touched: taking a key renews nothing.
    fn took(&self, took: bool) {
        let mut s = lock(&self.state);
        if took {
            s.held = true;
            s.holder = Some(self.me.clone());
        }
    }

    /// Renews the lease (the thread of [`Claim::keep`] calls it). A lease etcd no longer knows
    /// is dropped: the key went with it, and only a new acquisition holds it again.
    pub fn renew(&self) -> Result<(), EtcdError> {
        let Some(lease) = lock(&self.state).lease else { return Ok(()) };
        let sent = Instant::now();
        let left = match self.etcd.keepalive(lease) {
            Err(e) if lease_gone(&e) => Ok(0),
            other => other,
        };
        let left = self.noted(left)?;
        let mut s = lock(&self.state);
        if left > 0 {
            s.renewed = Some(sent);
        } else {
            s.lease = None;
            s.held = false;
            s.standby = None;
        }
        Ok(())
    }

    /// Whether this replica holds the key and its lease cannot have expired yet.
    pub fn holds(&self) -> bool {
        let s = lock(&self.state);
        let ttl = self.ttl();
        s.held && s.renewed.is_some_and(|t| t.elapsed() + margin(ttl) < ttl)
    }

    /// Gives the key up (this replica stops serving: a step-down, a clean stop).
    pub fn release(&self) {
        let was = std::mem::take(&mut lock(&self.state).held);
        if was {
            let _ = self.noted(self.etcd.delete_if(&self.key(), &self.me));
        }
    }

    /// Who holds the VM's key now (asks etcd).
    pub fn holder(&self) -> Result<Option<String>, EtcdError> {
        let h = self.noted(self.etcd.get(&self.key()))?.map(|kv| kv.value);
        lock(&self.state).holder = h.clone();
        Ok(h)
    }

    /// Registers this replica as a standby for the VM, reachable at `uri`.
    pub fn register_standby(&self, uri: &str) -> Result<(), EtcdError> {
        let lease = self.lease()?;
        self.noted(self.etcd.put(&self.standby_key(), uri, lease))?;
        lock(&self.state).standby = Some(uri.to_string());
        Ok(())
    }

    /// Withdraws the standby registration.
    pub fn unregister_standby(&self) {
        if lock(&self.state).standby.take().is_some() {
            let _ = self.noted(self.etcd.delete(&self.standby_key()));
        }
    }

    /// The registered standbys other than this replica: (name, URI).
    pub fn standbys(&self) -> Result<Vec<(String, String)>, EtcdError> {
        let prefix = format!("/colo/{}/standby/", self.vm);
        let kvs = self.noted(self.etcd.list(&prefix))?;
        Ok(kvs
            .into_iter()
            .filter_map(|kv| Some((kv.key.strip_prefix(&prefix)?.to_string(), kv.value)))
            .filter(|(name, _)| name != &self.me)
            .collect())
    }

    /// The status for `query-colo-status`.
    pub fn status(&self) -> ArbiterStatus {
        let held = self.holds();
        let s = lock(&self.state);
        ArbiterStatus {
            endpoints: self.etcd.endpoints().to_vec(),
            me: self.me.clone(),
            holder: s.holder.clone(),
            pair: s.pair.clone(),
            held,
            lease_left_ms: s.lease.and(s.renewed).map(|t| self.ttl().saturating_sub(t.elapsed()).as_millis() as u64),
            last_renewal_ms_ago: s.renewed.map(|t| t.elapsed().as_millis() as u64),
            reachable: s.reachable,
            error: s.error.clone(),
            ttl_ms: self.ttl().as_millis() as u64,
        }
    }

    /// Renews the lease every quarter of the TTL on a thread of its own, until stopped.
    pub fn keep(self: &Arc<Self>) -> std::io::Result<Keeper> {
        let stop = Arc::new(AtomicBool::new(false));
        let (claim, s) = (self.clone(), stop.clone());
        let thread = std::thread::Builder::new().name("arbiter-lease".into()).spawn(move || {
            // Said when it starts failing, every 10 s while it does, and when it works again.
            let mut failing_since: Option<Instant> = None;
            let mut said = Instant::now();
            while !s.load(Ordering::Relaxed) {
                match claim.renew() {
                    Err(e) => {
                        if failing_since.is_none() || said.elapsed() >= Duration::from_secs(10) {
                            tracing::warn!(target: "colo", error = %e, "cannot renew the arbiter lease");
                            said = Instant::now();
                        }
                        failing_since.get_or_insert_with(Instant::now);
                    }
                    Ok(()) => {
                        if let Some(t) = failing_since.take() {
                            let ms = t.elapsed().as_millis() as u64;
                            tracing::info!(target: "colo", failed_for_ms = ms, "the arbiter answers again");
                        }
                    }
                }
                std::thread::sleep(claim.ttl() / 4);
            }
        })?;
        Ok(Keeper { stop, thread: Some(thread) })
    }
}

/// The renewing thread; stops on drop.
pub struct Keeper {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Keeper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arbiter::testing::EtcdServer;

    fn claim(server: &EtcdServer, me: &str, ttl_ms: u64) -> Arc<Claim> {
        Arc::new(Claim::new(server.client(), "vm1", me, Duration::from_millis(ttl_ms)))
    }

    #[test]
    fn one_replica_holds_the_key_the_other_waits_until_its_lease_expires() {
        let Some(server) = EtcdServer::start("claim_expiry") else { return };
        let (a, b) = (claim(&server, "a", 1000), claim(&server, "b", 1000));
        assert!(a.acquire().unwrap());
        assert!(a.holds());
        assert!(a.protect_with("b").unwrap(), "COLO with b");
        assert!(!b.acquire().unwrap(), "held by a");
        assert_eq!(b.holder().unwrap().as_deref(), Some("a"));
        // a stops renewing (as a frozen or cut-off replica would): it stops counting on the
        // key before etcd can expire it...
        std::thread::sleep(Duration::from_millis(800));
        assert!(!a.holds(), "a must stop serving before its lease can expire: {:?}", a.status());
        // ...and b gets it once etcd has expired it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !b.acquire().unwrap() {
            assert!(Instant::now() < deadline, "the lease never expired");
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(b.holder().unwrap().as_deref(), Some("b"));
        assert_eq!(b.pair().unwrap().as_deref(), Some("b"), "b serves alone now");
        a.renew().unwrap();
        assert!(!a.holds() && !a.acquire().unwrap(), "a never holds it again without acquiring it");
        assert!(!a.eligible().unwrap(), "a's VM is out of date: b served alone");
    }

    #[test]
    fn a_secondary_left_behind_never_takes_the_key() {
        let Some(server) = EtcdServer::start("claim_behind") else { return };
        let (a, b) = (claim(&server, "a", 1000), claim(&server, "b", 1000));
        assert!(a.acquire().unwrap() && a.protect_with("b").unwrap());
        assert!(b.eligible().unwrap());
        // a loses b and goes on alone: b's VM no longer has what the clients saw.
        assert!(a.serve_alone().unwrap());
        assert!(!b.eligible().unwrap());
        assert!(!b.take_from("a").unwrap(), "not even from a dead a");
        // a stops renewing; its lease expires; b still may not serve, a may again.
        std::thread::sleep(Duration::from_millis(2500));
        assert_eq!(b.holder().unwrap(), None, "expired");
        assert!(!b.acquire().unwrap(), "b is out of date");
        assert!(a.acquire().unwrap(), "a served alone: its VM is the one the clients saw");
        // Only the holder records pairs.
        assert!(!b.protect_with("c").unwrap() && !b.serve_alone().unwrap());
        assert_eq!(a.pair().unwrap().as_deref(), Some("a"));
    }

    #[test]
    fn a_renewed_claim_holds_and_a_dead_holder_can_be_replaced_at_once() {
        let Some(server) = EtcdServer::start("claim_renew") else { return };
        let (a, b) = (claim(&server, "a", 1000), claim(&server, "b", 1000));
        assert!(a.acquire().unwrap() && a.protect_with("b").unwrap());
        let _keeper = a.keep().unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        assert!(a.holds(), "renewed: {:?}", a.status());
        assert!(!b.take_from("c").unwrap(), "only from the holder named");
        assert!(b.take_from("a").unwrap(), "a's process is gone: b takes the key at once");
        assert_eq!(b.holder().unwrap().as_deref(), Some("b"));
        let st = b.status();
        assert!(st.held && st.reachable && st.lease_left_ms.unwrap() > 0, "{st:?}");
    }

    #[test]
    fn standbys_register_on_their_lease_and_vanish_with_it() {
        let Some(server) = EtcdServer::start("claim_standby") else { return };
        let (p, s1, s2) = (claim(&server, "p", 1000), claim(&server, "s1", 1000), claim(&server, "s2", 1000));
        s1.register_standby("tcp:10.99.0.3:4444").unwrap();
        s2.register_standby("tcp:10.99.0.4:4444").unwrap();
        let _keep = s2.keep().unwrap();
        let mut list = p.standbys().unwrap();
        list.sort();
        assert_eq!(list, vec![("s1".into(), "tcp:10.99.0.3:4444".into()), ("s2".into(), "tcp:10.99.0.4:4444".into())]);
        assert_eq!(s1.standbys().unwrap().len(), 1, "not itself");
        // s1 stops renewing: its registration goes with its lease.
        std::thread::sleep(Duration::from_millis(2500));
        assert_eq!(p.standbys().unwrap(), vec![("s2".into(), "tcp:10.99.0.4:4444".into())]);
        s2.unregister_standby();
        assert!(p.standbys().unwrap().is_empty());
    }

    #[test]
    fn an_unreachable_arbiter_is_reported_and_holds_nothing() {
        let c = Claim::new(
            Etcd::new(vec!["http://127.0.0.1:9".into()], Duration::from_millis(200)),
            "vm",
            "a",
            Duration::from_secs(1),
        );
        assert!(matches!(c.acquire(), Err(EtcdError::Unreachable(_))));
        let st = c.status();
        assert!(!st.held && !st.reachable && st.error.is_some(), "{st:?}");
    }
}
