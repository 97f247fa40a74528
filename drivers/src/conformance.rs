//! The driver conformance suite: libvirt's state tables for domains,
//! networks, pools and volumes, written once against [`Connection`] and run
//! unchanged against every driver.
//!
//! A driver's test file supplies a connection factory and a [`Fixture`] (how
//! to build a domain, a network and a pool for that driver) and expands
//! [`conformance_tests!`](crate::conformance_tests), which makes one `#[test]`
//! per case:
//!
//! ```ignore
//! vireo_drivers::conformance_tests!(
//!     || vireo_drivers::open("test:///default").expect("open"),
//!     vireo_drivers::conformance::test_driver_fixture()
//! );
//! ```
//!
//! Rules every case follows, so that drivers with real guests can run them:
//!
//! * no transition is assumed instant: after each one the case polls the
//!   state with [`wait_for_state`] (the test driver answers at once);
//! * IDs are never assumed to be particular numbers, only present while
//!   active, absent while inactive, and new on every activation;
//! * sizes are computed from `pool_info`, never hard-coded;
//! * each case names its objects `conf-<case>...`, removes any leftover of an
//!   earlier run before it starts, and destroys and undefines everything it
//!   made when it ends, pass or fail, so cases can share a connection.

use std::collections::BTreeMap;
use std::fmt;
use std::thread;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use vireo_crds::quantity::{format_bytes, parse_quantity};
use vireo_crds::storage_vol::CloneSource;
use vireo_crds::{
    Domain, DomainDevices, DomainReason, DomainSpec, DomainState, DomainType, ForwardMode,
    Lifecycle, LifecycleAction, Network, NetworkSpec, ObjectKind, PoolType, RunStrategy,
    StoragePool, StoragePoolSpec, StorageVol, StorageVolSpec, VolFormat, VolumeSource,
};

use crate::error::ObjectName;
use crate::{Connection, Error, ListFilter, Lookup, PoolInfo, PoolState, ResizeFlags};

// ---------------------------------------------------------------------------
// Failures and assertions
// ---------------------------------------------------------------------------

/// Why a case failed: a message that says what was expected and what the
/// driver did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    message: String,
}

impl Failure {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

/// Fails the case with a formatted message unless the condition holds.
macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err(Failure::new(format!($($arg)+)));
        }
    };
}

/// Turns an unexpected driver error into a [`Failure`] that says which step failed.
trait Step<T> {
    fn step(self, what: &str) -> Result<T, Failure>;
}

impl<T> Step<T> for crate::Result<T> {
    fn step(self, what: &str) -> Result<T, Failure> {
        self.map_err(|e| Failure::new(format!("{what}: unexpected error: {e} ({e:?})")))
    }
}

/// The error variants a case expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expected {
    NotFound,
    InvalidState,
    InvalidArgument,
    AlreadyExists,
    NoSpace,
    OperationFailed,
}

impl Expected {
    fn matches(self, e: &Error) -> bool {
        matches!(
            (self, e),
            (Self::NotFound, Error::NotFound(_))
                | (Self::InvalidState, Error::InvalidState { .. })
                | (Self::InvalidArgument, Error::InvalidArgument { .. })
                | (Self::AlreadyExists, Error::AlreadyExists { .. })
                | (Self::NoSpace, Error::NoSpace { .. })
                | (Self::OperationFailed, Error::OperationFailed { .. })
        )
    }
}

/// Checks that an operation was refused with one of `kinds`, and that the
/// message names one of `objects` (e.g. `domain 'conf-x'`).
fn refused_any<T: fmt::Debug>(
    what: &str,
    result: crate::Result<T>,
    kinds: &[Expected],
    objects: &[&str],
) -> Result<Error, Failure> {
    let want = format!("{kinds:?} naming {}", objects.join(" or "));
    match result {
        Ok(v) => Err(Failure::new(format!(
            "{what}: expected {want}, but it succeeded ({v:?})"
        ))),
        Err(e) if !kinds.iter().any(|k| k.matches(&e)) => Err(Failure::new(format!(
            "{what}: expected {want}, got {e:?} ({e})"
        ))),
        Err(e) => {
            let text = e.to_string();
            if objects.iter().any(|o| text.contains(o)) {
                Ok(e)
            } else {
                Err(Failure::new(format!(
                    "{what}: the error should name {}, but reads \"{text}\"",
                    objects.join(" or ")
                )))
            }
        }
    }
}

/// Checks that an operation was refused with `kind`, naming `object`.
fn refused<T: fmt::Debug>(
    what: &str,
    result: crate::Result<T>,
    kind: Expected,
    object: &str,
) -> Result<Error, Failure> {
    refused_any(what, result, &[kind], &[object])
}

fn label(kind: ObjectKind, name: &str) -> String {
    ObjectName::new(kind, name).to_string()
}
fn dom_label(name: &str) -> String {
    label(ObjectKind::Domain, name)
}
fn net_label(name: &str) -> String {
    label(ObjectKind::Network, name)
}
fn pool_label(name: &str) -> String {
    label(ObjectKind::StoragePool, name)
}
fn vol_label(name: &str) -> String {
    label(ObjectKind::StorageVol, name)
}

fn bytes_of(what: &str, q: &Quantity) -> Result<u64, Failure> {
    parse_quantity(q).map_err(|e| Failure::new(format!("{what}: '{}' is not a size: {e}", q.0)))
}

fn parse_uuid(what: &str, text: &str) -> Result<uuid::Uuid, Failure> {
    uuid::Uuid::parse_str(text)
        .map_err(|e| Failure::new(format!("{what}: '{text}' is not a UUID: {e}")))
}

const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------------
// The fixture
// ---------------------------------------------------------------------------

/// Builds an object of the given name for the driver under test.
pub type Maker<T> = Box<dyn Fn(&str) -> T + Send + Sync>;

/// What a driver's test supplies: how to build objects it can run, and how
/// long its transitions may take.
pub struct Fixture {
    /// A domain this driver can define and start. The suite changes only the
    /// name, the UUID, memory sizes, vCPU counts and the lifecycle actions.
    pub make_domain: Maker<Domain>,
    /// A network this driver can define and start. Each name must get its
    /// own bridge and subnet (or none), since a case may run two at once.
    pub make_network: Maker<Network>,
    /// A pool this driver can define, build and start. Each name must get its
    /// own path; for `create_pool` (transient, no build) the path must be
    /// usable without a build.
    pub make_pool: Maker<StoragePool>,
    /// The longest a state change (start, shutdown, reboot, destroy) may take.
    pub timeout: Duration,
}

impl Fixture {
    /// The fixture's domain, named `name`.
    pub fn domain(&self, name: &str) -> Domain {
        let mut d = (self.make_domain)(name);
        d.metadata.name = Some(name.to_string());
        d
    }
    /// The fixture's network, named `name`.
    pub fn network(&self, name: &str) -> Network {
        let mut n = (self.make_network)(name);
        n.metadata.name = Some(name.to_string());
        n
    }
    /// The fixture's pool, named `name`.
    pub fn pool(&self, name: &str) -> StoragePool {
        let mut p = (self.make_pool)(name);
        p.metadata.name = Some(name.to_string());
        p
    }
}

use crate::test::CAPACITY_ANNOTATION as TEST_CAPACITY_ANNOTATION;

/// The fixture for `test:///default`: `type: test` domains of 1Gi and
/// 1 vCPU (at most 2), NAT networks with a bridge the driver picks, and dir
/// pools of 10Gi under `/var/lib/vireo/conformance/` (bookkeeping only: the
/// test driver writes no file).
pub fn test_driver_fixture() -> Fixture {
    Fixture {
        make_domain: Box::new(|name| {
            Domain::new(
                name,
                DomainSpec {
                    domain_type: DomainType::Test,
                    arch: None,
                    uuid: None,
                    memory: Quantity("1Gi".into()),
                    current_memory: None,
                    vcpus: 1,
                    max_vcpus: Some(2),
                    os: None,
                    devices: DomainDevices::default(),
                    cloud_init: None,
                    run_strategy: RunStrategy::Manual,
                    lifecycle: Lifecycle::default(),
                    node_selector: None,
                    eviction_strategy: None,
                },
            )
        }),
        make_network: Box::new(|name| {
            Network::new(
                name,
                NetworkSpec {
                    uuid: None,
                    forward_mode: ForwardMode::Nat,
                    bridge: None,
                    ip: None,
                    autostart: false,
                    active: None,
                    node_selector: None,
                },
            )
        }),
        make_pool: Box::new(|name| {
            let mut pool = StoragePool::new(
                name,
                StoragePoolSpec {
                    uuid: None,
                    pool_type: PoolType::Dir,
                    path: format!("/var/lib/vireo/conformance/{name}"),
                    autostart: false,
                    active: None,
                    node_selector: None,
                },
            );
            pool.metadata.annotations = Some(BTreeMap::from([(
                TEST_CAPACITY_ANNOTATION.to_string(),
                "10Gi".to_string(),
            )]));
            pool
        }),
        timeout: Duration::from_secs(5),
    }
}

// ---------------------------------------------------------------------------
// Polling
// ---------------------------------------------------------------------------

/// Polls `domain_state` until the domain is in `state`, and returns the
/// reason. Fails when the domain disappears or the timeout passes.
pub fn wait_for_state(
    conn: &Connection,
    name: &str,
    state: DomainState,
    timeout: Duration,
) -> Result<DomainReason, Failure> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(5);
    loop {
        let (now, reason) = conn
            .hypervisor()
            .domain_state(name)
            .step(&format!("waiting for domain '{name}' to be {state}"))?;
        if now == state {
            return Ok(reason);
        }
        if start.elapsed() >= timeout {
            return Err(Failure::new(format!(
                "domain '{name}' is still {now} ({reason}) after {timeout:?}; expected {state}"
            )));
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// Polls until a domain lookup by name says NotFound (a transient domain
/// that stopped).
pub fn wait_until_gone(conn: &Connection, name: &str, timeout: Duration) -> Result<(), Failure> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(5);
    loop {
        match conn.hypervisor().lookup_domain(Lookup::Name(name)) {
            Err(Error::NotFound(_)) => return Ok(()),
            Err(e) => {
                return Err(Failure::new(format!(
                    "waiting for domain '{name}' to disappear: unexpected error: {e}"
                )));
            }
            Ok(r) if start.elapsed() >= timeout => {
                return Err(Failure::new(format!(
                    "domain '{name}' still exists after {timeout:?} ({r:?}); a stopped transient domain must disappear"
                )));
            }
            Ok(_) => {}
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// Waits for `state` and checks the reason.
fn expect_state(
    conn: &Connection,
    fx: &Fixture,
    name: &str,
    state: DomainState,
    reason: DomainReason,
) -> Result<(), Failure> {
    let got = wait_for_state(conn, name, state, fx.timeout)?;
    ensure!(
        got == reason,
        "domain '{name}' is {state} with reason '{got}', expected reason '{reason}'"
    );
    Ok(())
}

/// Polls a reading until it has the wanted value (live changes on a real
/// guest, such as ballooning, take a moment).
fn wait_for_value<T: PartialEq + fmt::Debug>(
    what: &str,
    timeout: Duration,
    want: &T,
    mut read: impl FnMut() -> Result<T, Failure>,
) -> Result<(), Failure> {
    let start = Instant::now();
    loop {
        let got = read()?;
        if &got == want {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            return Err(Failure::new(format!(
                "{what}: got {got:?} after {timeout:?}, expected {want:?}"
            )));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------
// Cleanup
// ---------------------------------------------------------------------------

/// The objects a case makes, removed before it starts and after it ends.
#[derive(Default)]
struct Made {
    domains: Vec<String>,
    networks: Vec<String>,
    pools: Vec<String>,
}

fn owned(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| (*n).to_string()).collect()
}

impl Made {
    fn domains(names: &[&str]) -> Self {
        Self {
            domains: owned(names),
            ..Self::default()
        }
    }
    fn networks(names: &[&str]) -> Self {
        Self {
            networks: owned(names),
            ..Self::default()
        }
    }
    fn pools(names: &[&str]) -> Self {
        Self {
            pools: owned(names),
            ..Self::default()
        }
    }
}

/// Destroys and undefines a domain, whatever its state; errors are ignored
/// (the leftover check reports what stays).
fn purge_domain(conn: &Connection, fx: &Fixture, name: &str) {
    let hv = conn.hypervisor();
    for _ in 0..3 {
        let Ok((state, _)) = hv.domain_state(name) else {
            return;
        };
        if state.is_active() {
            let _ = hv.destroy_domain(name);
            let start = Instant::now();
            while start.elapsed() < fx.timeout {
                match hv.domain_state(name) {
                    Ok((s, _)) if s.is_active() => thread::sleep(Duration::from_millis(20)),
                    _ => break,
                }
            }
        }
        if let Ok(snapshots) = hv.snapshot_list(name) {
            for s in snapshots {
                let _ = hv.snapshot_delete(name, &s.name);
            }
        }
        if hv.domain_is_persistent(name).unwrap_or(false) {
            let _ = hv.undefine_domain(name);
        }
    }
}

fn purge_network(conn: &Connection, name: &str) {
    let n = conn.network();
    for _ in 0..3 {
        let Ok(info) = n.network_info(name) else {
            return;
        };
        if info.active {
            let _ = n.destroy_network(name);
        }
        if info.persistent {
            let _ = n.undefine_network(name);
        }
    }
}

/// Deletes a pool's volumes (starting it if needed), then stops, deletes and
/// undefines it.
fn purge_pool(conn: &Connection, name: &str) {
    let st = conn.storage();
    for _ in 0..3 {
        let Ok(info) = st.pool_info(name) else {
            return;
        };
        if info.state != PoolState::Running {
            let _ = st.start_pool(name);
        }
        if let Ok(vols) = st.list_volumes(name) {
            for v in vols {
                let _ = st.delete_volume(name, &v.name);
            }
        }
        let _ = st.destroy_pool(name);
        let _ = st.delete_pool(name);
        let _ = st.undefine_pool(name);
    }
}

fn purge(conn: &Connection, fx: &Fixture, made: &Made) {
    for d in &made.domains {
        purge_domain(conn, fx, d);
    }
    for n in &made.networks {
        purge_network(conn, n);
    }
    for p in &made.pools {
        purge_pool(conn, p);
    }
}

/// What a purge could not remove.
fn leftovers(conn: &Connection, made: &Made) -> Vec<String> {
    let mut out = Vec::new();
    for d in &made.domains {
        if conn.hypervisor().lookup_domain(Lookup::Name(d)).is_ok() {
            out.push(dom_label(d));
        }
    }
    for n in &made.networks {
        if conn.network().lookup_network(Lookup::Name(n)).is_ok() {
            out.push(net_label(n));
        }
    }
    for p in &made.pools {
        if conn.storage().lookup_pool(Lookup::Name(p)).is_ok() {
            out.push(pool_label(p));
        }
    }
    out
}

/// Runs a case body between two purges of what it makes. A case that passes
/// but leaves something behind fails.
fn guarded(
    conn: &Connection,
    fx: &Fixture,
    made: Made,
    body: impl FnOnce() -> Result<(), Failure>,
) -> Result<(), Failure> {
    purge(conn, fx, &made);
    let before = leftovers(conn, &made);
    if !before.is_empty() {
        return Err(Failure::new(format!(
            "cannot remove leftovers of an earlier run: {}",
            before.join(", ")
        )));
    }
    let result = body();
    purge(conn, fx, &made);
    let after = leftovers(conn, &made);
    match result {
        Err(e) => Err(e),
        Ok(()) if after.is_empty() => Ok(()),
        Ok(()) => Err(Failure::new(format!(
            "the case passed but its cleanup left {} behind",
            after.join(", ")
        ))),
    }
}

// ---------------------------------------------------------------------------
// Shared checks
// ---------------------------------------------------------------------------

fn domain_names(conn: &Connection, filter: ListFilter) -> Result<Vec<String>, Failure> {
    Ok(conn
        .hypervisor()
        .list_domains(filter)
        .step(&format!("list_domains({filter:?})"))?
        .into_iter()
        .map(|d| d.name)
        .collect())
}

fn network_names(conn: &Connection, filter: ListFilter) -> Result<Vec<String>, Failure> {
    Ok(conn
        .network()
        .list_networks(filter)
        .step(&format!("list_networks({filter:?})"))?
        .into_iter()
        .map(|n| n.name)
        .collect())
}

fn pool_names(conn: &Connection, filter: ListFilter) -> Result<Vec<String>, Failure> {
    Ok(conn
        .storage()
        .list_pools(filter)
        .step(&format!("list_pools({filter:?})"))?
        .into_iter()
        .map(|p| p.name)
        .collect())
}

fn expect_listed(what: &str, names: &[String], name: &str, listed: bool) -> Result<(), Failure> {
    let is = names.iter().any(|n| n == name);
    ensure!(
        is == listed,
        "{what}: '{name}' should {}be listed, the list is {names:?}",
        if listed { "" } else { "not " }
    );
    Ok(())
}

/// Checks that `count` agrees with the length of `list`. Other clients may
/// add or remove objects meanwhile, so a disagreement is retried a few times.
fn counts_agree(
    what: &str,
    list: impl Fn() -> Result<usize, Failure>,
    count: impl Fn() -> Result<usize, Failure>,
) -> Result<(), Failure> {
    let mut last = (0, 0, 0);
    for _ in 0..5 {
        let before = count()?;
        let listed = list()?;
        let after = count()?;
        if before == listed && listed == after {
            return Ok(());
        }
        last = (before, listed, after);
        thread::sleep(Duration::from_millis(20));
    }
    Err(Failure::new(format!(
        "{what}: the count ({}, then {}) never agreed with the list length ({})",
        last.0, last.2, last.1
    )))
}

/// Checks that All = Active + Inactive, retrying a few times like [`counts_agree`].
fn all_is_active_plus_inactive(
    what: &str,
    count: impl Fn(ListFilter) -> Result<usize, Failure>,
) -> Result<(), Failure> {
    let mut last = (0, 0, 0);
    for _ in 0..5 {
        let all = count(ListFilter::All)?;
        let active = count(ListFilter::Active)?;
        let inactive = count(ListFilter::Inactive)?;
        if all == active + inactive {
            return Ok(());
        }
        last = (all, active, inactive);
        thread::sleep(Duration::from_millis(20));
    }
    Err(Failure::new(format!(
        "{what}: All counts {} but Active {} + Inactive {}",
        last.0, last.1, last.2
    )))
}

/// An ID no active domain has.
fn unused_domain_id(conn: &Connection) -> Result<u32, Failure> {
    let ids: Vec<u32> = conn
        .hypervisor()
        .list_domains(ListFilter::Active)
        .step("list_domains(Active)")?
        .into_iter()
        .filter_map(|d| d.id)
        .collect();
    let mut id = 1_000_000;
    while ids.contains(&id) {
        id += 1;
    }
    Ok(id)
}

/// Defines the fixture's domain and returns it with its reference.
fn define(conn: &Connection, fx: &Fixture, name: &str) -> Result<crate::DomainRef, Failure> {
    let r = conn
        .hypervisor()
        .define_domain(&fx.domain(name))
        .step(&format!("define domain '{name}'"))?;
    ensure!(
        r.name == name,
        "define of '{name}' returned a reference to '{}'",
        r.name
    );
    Ok(r)
}

/// Defines and starts the fixture's domain, and waits until it runs.
fn define_and_start(
    conn: &Connection,
    fx: &Fixture,
    name: &str,
) -> Result<crate::DomainRef, Failure> {
    define(conn, fx, name)?;
    let r = conn
        .hypervisor()
        .start_domain(name)
        .step(&format!("start domain '{name}'"))?;
    expect_state(conn, fx, name, DomainState::Running, DomainReason::Booted)?;
    ensure!(r.id.is_some(), "start of '{name}' returned no ID: {r:?}");
    Ok(r)
}

fn current_id(conn: &Connection, name: &str) -> Result<Option<u32>, Failure> {
    Ok(conn
        .hypervisor()
        .lookup_domain(Lookup::Name(name))
        .step(&format!("lookup domain '{name}'"))?
        .id)
}

fn max_memory(conn: &Connection, name: &str, inactive: bool) -> Result<u64, Failure> {
    let def = conn
        .hypervisor()
        .domain_definition(name, inactive)
        .step(&format!("definition of '{name}' (inactive: {inactive})"))?;
    bytes_of("spec.memory", &def.spec.memory)
}

/// Domain operations, to check several against one state.
#[derive(Debug, Clone, Copy)]
enum DomOp {
    Start,
    Shutdown,
    Suspend,
    Resume,
    Reboot,
    Reset,
    Destroy,
}

fn domain_op(conn: &Connection, op: DomOp, name: &str) -> crate::Result<()> {
    let hv = conn.hypervisor();
    match op {
        DomOp::Start => hv.start_domain(name).map(|_| ()),
        DomOp::Shutdown => hv.shutdown_domain(name),
        DomOp::Suspend => hv.suspend_domain(name),
        DomOp::Resume => hv.resume_domain(name),
        DomOp::Reboot => hv.reboot_domain(name),
        DomOp::Reset => hv.reset_domain(name),
        DomOp::Destroy => hv.destroy_domain(name),
    }
}

// ---------------------------------------------------------------------------
// Domain cases
// ---------------------------------------------------------------------------

/// define → shutoff (unknown), no ID, persistent, found by name and UUID,
/// listed inactive, not found by any ID.
pub fn case_domain_define(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let name = "conf-dom-define";
    guarded(conn, fx, Made::domains(&[name]), || {
        let hv = conn.hypervisor();
        let r = define(conn, fx, name)?;
        ensure!(r.id.is_none(), "a defined domain has no ID, got {:?}", r.id);
        let uuid = parse_uuid("define's UUID", &r.uuid)?;
        expect_state(conn, fx, name, DomainState::Shutoff, DomainReason::Unknown)?;
        ensure!(
            hv.domain_is_persistent(name).step("is_persistent")?,
            "a defined domain is persistent"
        );
        ensure!(
            !hv.domain_autostart(name).step("autostart")?,
            "a defined domain does not autostart"
        );
        let by_name = hv
            .lookup_domain(Lookup::Name(name))
            .step("lookup by name")?;
        ensure!(
            by_name == r,
            "lookup by name gave {by_name:?}, define gave {r:?}"
        );
        let by_uuid = hv
            .lookup_domain(Lookup::Uuid(uuid))
            .step("lookup by UUID")?;
        ensure!(
            by_uuid == r,
            "lookup by UUID gave {by_uuid:?}, define gave {r:?}"
        );
        let active = hv.list_domains(ListFilter::Active).step("list active")?;
        ensure!(
            active.iter().all(|d| d.name != name),
            "an inactive domain has no ID to be found by, but it is listed active: {active:?}"
        );
        let id = unused_domain_id(conn)?;
        refused(
            "lookup by an unused ID",
            hv.lookup_domain(Lookup::Id(id)),
            Expected::NotFound,
            &dom_label(&id.to_string()),
        )?;
        expect_listed(
            "list Inactive",
            &domain_names(conn, ListFilter::Inactive)?,
            name,
            true,
        )?;
        expect_listed(
            "list All",
            &domain_names(conn, ListFilter::All)?,
            name,
            true,
        )?;
        expect_listed(
            "list Active",
            &domain_names(conn, ListFilter::Active)?,
            name,
            false,
        )?;
        let def = hv.domain_definition(name, false).step("definition")?;
        ensure!(
            def.spec.uuid.as_deref().map(str::to_ascii_lowercase)
                == Some(r.uuid.to_ascii_lowercase()),
            "the definition carries UUID {:?}, the reference {}",
            def.spec.uuid,
            r.uuid
        );
        let info = hv.domain_info(name).step("domain_info")?;
        ensure!(
            info.state == DomainState::Shutoff,
            "domain_info says {}, domain_state says shutoff",
            info.state
        );
        Ok(())
    })
}

/// start → running (booted) with an ID that finds it; start again → InvalidState.
pub fn case_domain_start(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let name = "conf-dom-start";
    guarded(conn, fx, Made::domains(&[name]), || {
        let hv = conn.hypervisor();
        let defined = define(conn, fx, name)?;
        let r = hv.start_domain(name).step("start")?;
        expect_state(conn, fx, name, DomainState::Running, DomainReason::Booted)?;
        let Some(id) = r.id else {
            return Err(Failure::new(format!("start returned no ID: {r:?}")));
        };
        ensure!(
            r.uuid == defined.uuid,
            "start changed the UUID: {r:?} vs {defined:?}"
        );
        let by_id = hv.lookup_domain(Lookup::Id(id)).step("lookup by ID")?;
        ensure!(
            by_id.name == name,
            "ID {id} finds {by_id:?}, expected '{name}'"
        );
        ensure!(
            current_id(conn, name)? == Some(id),
            "lookup by name does not show the ID {id} start returned"
        );
        expect_listed(
            "list Active",
            &domain_names(conn, ListFilter::Active)?,
            name,
            true,
        )?;
        expect_listed(
            "list Inactive",
            &domain_names(conn, ListFilter::Inactive)?,
            name,
            false,
        )?;
        refused(
            "start of a running domain",
            hv.start_domain(name),
            Expected::InvalidState,
            &dom_label(name),
        )?;
        ensure!(
            current_id(conn, name)? == Some(id),
            "a refused start changed the ID"
        );
        expect_state(conn, fx, name, DomainState::Running, DomainReason::Booted)?;
        Ok(())
    })
}

/// suspend → paused (user); suspend again → InvalidState; resume → running
/// (unpaused); resume of a running domain → InvalidState.
pub fn case_domain_suspend_resume(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let name = "conf-dom-suspend";
    guarded(conn, fx, Made::domains(&[name]), || {
        let hv = conn.hypervisor();
        let r = define_and_start(conn, fx, name)?;
        hv.suspend_domain(name).step("suspend")?;
        expect_state(conn, fx, name, DomainState::Paused, DomainReason::User)?;
        ensure!(
            current_id(conn, name)? == r.id,
            "a paused domain keeps its ID"
        );
        expect_listed(
            "list Active",
            &domain_names(conn, ListFilter::Active)?,
            name,
            true,
        )?;
        refused(
            "suspend of a paused domain",
            hv.suspend_domain(name),
            Expected::InvalidState,
            &dom_label(name),
        )?;
        expect_state(conn, fx, name, DomainState::Paused, DomainReason::User)?;
        hv.resume_domain(name).step("resume")?;
        expect_state(conn, fx, name, DomainState::Running, DomainReason::Unpaused)?;
        ensure!(
            current_id(conn, name)? == r.id,
            "a resumed domain keeps its ID"
        );
        refused(
            "resume of a running domain",
            hv.resume_domain(name),
            Expected::InvalidState,
            &dom_label(name),
        )?;
        expect_state(conn, fx, name, DomainState::Running, DomainReason::Unpaused)?;
        Ok(())
    })
}

/// Save and restore, libvirt's `virDomainSave`/`Restore` and managed save,
/// on a driver that saves guest state (a driver that does not answers
/// `Unsupported` to the first save, and the case ends there): a saved
/// domain is shut off (saved) without an ID; a restore runs it again
/// (restored); a managed save makes the next start resume it and is gone
/// after it; a domain saved paused comes back paused; managedsave-remove
/// leaves nothing to resume.
pub fn case_domain_save_restore(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let name = "conf-dom-save";
    let file = std::env::temp_dir().join(format!(
        "vireo-conformance-save-{}-{:x}.save",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    ));
    let paused_file = file.with_extension("paused.save");
    let result = guarded(conn, fx, Made::domains(&[name]), || {
        let hv = conn.hypervisor();
        define_and_start(conn, fx, name)?;
        match hv.save_domain(name, &file) {
            Err(Error::Unsupported { .. }) => return Ok(()),
            other => other.step("save")?,
        }
        expect_state(conn, fx, name, DomainState::Shutoff, DomainReason::Saved)?;
        ensure!(
            current_id(conn, name)?.is_none(),
            "a saved domain has no ID"
        );
        let r = hv.restore_domain(&file).step("restore")?;
        ensure!(r.id.is_some(), "a restored domain has an ID");
        expect_state(conn, fx, name, DomainState::Running, DomainReason::Restored)?;

        hv.managed_save(name).step("managedsave")?;
        expect_state(conn, fx, name, DomainState::Shutoff, DomainReason::Saved)?;
        ensure!(
            hv.has_managed_save(name).step("has managed save")?,
            "a managed save image after managedsave"
        );
        hv.start_domain(name)
            .step("start resuming the managed save")?;
        expect_state(conn, fx, name, DomainState::Running, DomainReason::Restored)?;
        ensure!(
            !hv.has_managed_save(name).step("has managed save")?,
            "the managed save image is gone once resumed"
        );

        hv.suspend_domain(name).step("suspend")?;
        expect_state(conn, fx, name, DomainState::Paused, DomainReason::User)?;
        hv.save_domain(name, &paused_file)
            .step("save of a paused domain")?;
        expect_state(conn, fx, name, DomainState::Shutoff, DomainReason::Saved)?;
        hv.restore_domain(&paused_file)
            .step("restore of a paused save")?;
        wait_for_state(conn, name, DomainState::Paused, fx.timeout)?;
        hv.resume_domain(name).step("resume after the restore")?;
        wait_for_state(conn, name, DomainState::Running, fx.timeout)?;

        hv.managed_save(name).step("managedsave")?;
        hv.managed_save_remove(name).step("managedsave-remove")?;
        ensure!(
            !hv.has_managed_save(name).step("has managed save")?,
            "no managed save image after managedsave-remove"
        );
        hv.start_domain(name)
            .step("start after managedsave-remove")?;
        expect_state(conn, fx, name, DomainState::Running, DomainReason::Booted)?;
        Ok(())
    });
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_file(&paused_file);
    result
}

/// Snapshots, libvirt's `virDomainSnapshot*`, on a driver that takes them
/// (a driver that does not answers `Unsupported` to the first, and the
/// case ends there): a snapshot of a running domain holds its memory and
/// state `running`; one of a shut-off domain holds none, state `shutoff`,
/// its parent the one before; each new one is current. A revert brings the
/// domain back as the snapshot was (running or shut off, reason `from
/// snapshot`) and makes it current; `--running` boots one without memory.
/// A disk-only snapshot of a running domain is `disk-snapshot`. Names are
/// unique; an unknown one is not found; an inactive domain with snapshots
/// cannot be undefined; deleting a snapshot leaves the domain as it is and
/// hands its children to its parent.
pub fn case_domain_snapshots(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    use crate::snapshot::{RevertTo, SnapshotParams, SnapshotState};
    let name = "conf-dom-snap";
    let params = |snap: &str, disk_only: bool| SnapshotParams {
        name: Some(snap.to_string()),
        description: Some(format!("conformance {snap}")),
        disk_only,
    };
    let snap_label = |s: &str| label(ObjectKind::DomainSnapshot, s);
    guarded(conn, fx, Made::domains(&[name]), || {
        let hv = conn.hypervisor();
        define_and_start(conn, fx, name)?;
        let run = match hv.snapshot_create(name, &params("s-run", false)) {
            Err(Error::Unsupported { .. }) => return Ok(()),
            other => other.step("snapshot of the running domain")?,
        };
        ensure!(
            (run.state, run.memory, run.current, run.parent.as_deref())
                == (SnapshotState::Running, true, true, None),
            "a first snapshot of a running domain: running, with memory, current, no parent: {run:?}"
        );
        expect_state(conn, fx, name, DomainState::Running, DomainReason::Booted)?;
        refused(
            "a second snapshot of the same name",
            hv.snapshot_create(name, &params("s-run", false)),
            Expected::AlreadyExists,
            &snap_label("s-run"),
        )?;
        hv.destroy_domain(name).step("destroy")?;
        expect_state(
            conn,
            fx,
            name,
            DomainState::Shutoff,
            DomainReason::Destroyed,
        )?;
        let off = hv
            .snapshot_create(name, &params("s-off", false))
            .step("snapshot of the shut-off domain")?;
        ensure!(
            (off.state, off.memory, off.parent.as_deref())
                == (SnapshotState::Shutoff, false, Some("s-run")),
            "a snapshot of a shut-off domain: shutoff, no memory, parent s-run: {off:?}"
        );
        let names: Vec<String> = hv
            .snapshot_list(name)
            .step("snapshot list")?
            .into_iter()
            .map(|s| s.name)
            .collect();
        ensure!(
            names == ["s-run", "s-off"],
            "the list is oldest first: {names:?}"
        );
        refused(
            "undefine of an inactive domain with snapshots",
            hv.undefine_domain(name),
            Expected::InvalidState,
            &dom_label(name),
        )?;
        refused(
            "an unknown snapshot",
            hv.snapshot_get(name, "s-none"),
            Expected::NotFound,
            &snap_label("s-none"),
        )?;

        hv.snapshot_revert(name, "s-run", RevertTo::Snapshot)
            .step("revert to the running snapshot")?;
        expect_state(
            conn,
            fx,
            name,
            DomainState::Running,
            DomainReason::FromSnapshot,
        )?;
        ensure!(
            current_id(conn, name)?.is_some(),
            "a domain reverted to a running snapshot has an ID"
        );
        let current = hv.snapshot_current(name).step("current")?;
        ensure!(
            current.as_ref().map(|s| s.name.as_str()) == Some("s-run"),
            "the snapshot reverted to is current: {current:?}"
        );
        let disks = hv
            .snapshot_create(name, &params("s-disks", true))
            .step("disk-only snapshot of the running domain")?;
        ensure!(
            (disks.state, disks.memory, disks.parent.as_deref())
                == (SnapshotState::DiskSnapshot, false, Some("s-run")),
            "a disk-only snapshot of a running domain: disk-snapshot, no memory, parent s-run: {disks:?}"
        );
        let run = hv.snapshot_get(name, "s-run").step("info s-run")?;
        ensure!(
            (run.children, run.descendants) == (2, 2),
            "s-run has two children: {run:?}"
        );

        hv.snapshot_revert(name, "s-off", RevertTo::Snapshot)
            .step("revert to the shut-off snapshot")?;
        expect_state(
            conn,
            fx,
            name,
            DomainState::Shutoff,
            DomainReason::FromSnapshot,
        )?;
        ensure!(
            current_id(conn, name)?.is_none(),
            "a domain reverted to a shut-off snapshot has no ID"
        );
        hv.snapshot_revert(name, "s-off", RevertTo::Running)
            .step("revert --running to the shut-off snapshot")?;
        expect_state(
            conn,
            fx,
            name,
            DomainState::Running,
            DomainReason::FromSnapshot,
        )?;

        hv.snapshot_delete(name, "s-run").step("delete s-run")?;
        wait_for_state(conn, name, DomainState::Running, fx.timeout)?;
        let off = hv.snapshot_get(name, "s-off").step("info s-off")?;
        ensure!(
            off.parent.is_none() && off.current,
            "s-off goes to s-run's parent (none) and stays current: {off:?}"
        );
        refused(
            "a deleted snapshot",
            hv.snapshot_delete(name, "s-run"),
            Expected::NotFound,
            &snap_label("s-run"),
        )?;
        for s in ["s-off", "s-disks"] {
            hv.snapshot_delete(name, s).step(&format!("delete {s}"))?;
        }
        ensure!(
            hv.snapshot_list(name).step("snapshot list")?.is_empty(),
            "no snapshots after deleting them all"
        );
        ensure!(
            hv.snapshot_current(name).step("current")?.is_none(),
            "no current snapshot after deleting them all"
        );
        Ok(())
    })
}

/// A paused domain: shutdown ends in shutoff (shutdown); reboot brings it
/// back running (booted) in the same activation; reset keeps it paused
/// (same ID). libvirt's test driver does each at once; a guest behind a
/// process is run again to see the power button.
pub fn case_domain_paused_transitions(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let name = "conf-dom-paused";
    guarded(conn, fx, Made::domains(&[name]), || {
        let hv = conn.hypervisor();
        define_and_start(conn, fx, name)?;
        hv.suspend_domain(name).step("suspend")?;
        expect_state(conn, fx, name, DomainState::Paused, DomainReason::User)?;
        hv.shutdown_domain(name)
            .step("shutdown of a paused domain")?;
        expect_state(conn, fx, name, DomainState::Shutoff, DomainReason::Shutdown)?;
        ensure!(
            current_id(conn, name)?.is_none(),
            "a shut off domain has no ID"
        );

        let r = hv.start_domain(name).step("start after the shutdown")?;
        expect_state(conn, fx, name, DomainState::Running, DomainReason::Booted)?;
        hv.suspend_domain(name).step("suspend again")?;
        expect_state(conn, fx, name, DomainState::Paused, DomainReason::User)?;
        hv.reboot_domain(name).step("reboot of a paused domain")?;
        // Running again at once (unpaused) where the guest must see the
        // request; booted once the reboot is through.
        wait_for_value(
            "state after the reboot of a paused domain",
            fx.timeout,
            &(DomainState::Running, DomainReason::Booted),
            || hv.domain_state(name).step("domain_state"),
        )?;
        ensure!(
            current_id(conn, name)? == r.id,
            "a reboot keeps the activation and its ID"
        );

        hv.suspend_domain(name).step("suspend a third time")?;
        expect_state(conn, fx, name, DomainState::Paused, DomainReason::User)?;
        hv.reset_domain(name).step("reset of a paused domain")?;
        expect_state(conn, fx, name, DomainState::Paused, DomainReason::User)?;
        ensure!(
            current_id(conn, name)? == r.id,
            "a reset keeps the activation and its ID"
        );
        hv.resume_domain(name).step("resume after the reset")?;
        wait_for_state(conn, name, DomainState::Running, fx.timeout)?;
        Ok(())
    })
}

/// shutdown → (wait) shutoff (shutdown), ID gone, still defined; start again
/// → a new ID.
pub fn case_domain_shutdown(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let name = "conf-dom-shutdown";
    guarded(conn, fx, Made::domains(&[name]), || {
        let hv = conn.hypervisor();
        let first = define_and_start(conn, fx, name)?;
        hv.shutdown_domain(name).step("shutdown")?;
        expect_state(conn, fx, name, DomainState::Shutoff, DomainReason::Shutdown)?;
        ensure!(
            current_id(conn, name)?.is_none(),
            "a shut off domain has no ID"
        );
        if let Some(id) = first.id {
            refused(
                "lookup by the ID of a stopped activation",
                hv.lookup_domain(Lookup::Id(id)),
                Expected::NotFound,
                &dom_label(&id.to_string()),
            )?;
        }
        ensure!(
            hv.domain_is_persistent(name).step("is_persistent")?,
            "a shut off persistent domain stays persistent"
        );
        expect_listed(
            "list Inactive",
            &domain_names(conn, ListFilter::Inactive)?,
            name,
            true,
        )?;
        let second = hv.start_domain(name).step("start after shutdown")?;
        expect_state(conn, fx, name, DomainState::Running, DomainReason::Booted)?;
        ensure!(second.id.is_some(), "the second start returned no ID");
        ensure!(
            second.id != first.id,
            "every activation gets a new ID, but both starts gave {:?}",
            first.id
        );
        ensure!(
            second.uuid == first.uuid,
            "the UUID changed across restarts"
        );
        Ok(())
    })
}

/// shutdown, suspend, resume, reboot, reset and destroy of a shutoff domain
/// are refused with InvalidState, and change nothing.
pub fn case_domain_inactive_operations(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let name = "conf-dom-inactive-ops";
    guarded(conn, fx, Made::domains(&[name]), || {
        define(conn, fx, name)?;
        let label = dom_label(name);
        for op in [
            DomOp::Shutdown,
            DomOp::Suspend,
            DomOp::Resume,
            DomOp::Reboot,
            DomOp::Reset,
            DomOp::Destroy,
        ] {
            refused(
                &format!("{op:?} of a shutoff domain"),
                domain_op(conn, op, name),
                Expected::InvalidState,
                &label,
            )?;
            expect_state(conn, fx, name, DomainState::Shutoff, DomainReason::Unknown)?;
            ensure!(
                current_id(conn, name)?.is_none(),
                "a refused {op:?} gave the domain an ID"
            );
        }
        // The same after a real stop, whose reason must survive the refusals.
        define_and_start(conn, fx, name)?;
        conn.hypervisor().destroy_domain(name).step("destroy")?;
        expect_state(
            conn,
            fx,
            name,
            DomainState::Shutoff,
            DomainReason::Destroyed,
        )?;
        for op in [
            DomOp::Shutdown,
            DomOp::Suspend,
            DomOp::Resume,
            DomOp::Reboot,
            DomOp::Reset,
            DomOp::Destroy,
        ] {
            refused(
                &format!("{op:?} of a destroyed domain"),
                domain_op(conn, op, name),
                Expected::InvalidState,
                &label,
            )?;
        }
        expect_state(
            conn,
            fx,
            name,
            DomainState::Shutoff,
            DomainReason::Destroyed,
        )?;
        Ok(())
    })
}

/// reboot of a running domain → still running (onReboot defaults to
/// restart); reset → still running.
pub fn case_domain_reboot_reset(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let name = "conf-dom-reboot";
    guarded(conn, fx, Made::domains(&[name]), || {
        let hv = conn.hypervisor();
        let started = define_and_start(conn, fx, name)?;
        let before = hv.domain_info(name).step("domain_info")?;
        hv.reboot_domain(name).step("reboot")?;
        expect_state(conn, fx, name, DomainState::Running, DomainReason::Booted)?;
        ensure!(
            current_id(conn, name)? == started.id,
            "a guest reboot keeps the activation and its ID"
        );
        let after = hv.domain_info(name).step("domain_info")?;
        ensure!(
            after.memory == before.memory && after.vcpus == before.vcpus,
            "a guest reboot keeps live memory and vCPUs: {before:?} then {after:?}"
        );
        hv.reset_domain(name).step("reset")?;
        wait_for_state(conn, name, DomainState::Running, fx.timeout)?;
        ensure!(
            current_id(conn, name)?.is_some(),
            "a reset domain is active and has an ID"
        );
        ensure!(
            hv.domain_is_persistent(name).step("is_persistent")?,
            "reboot and reset keep the domain persistent"
        );
        Ok(())
    })
}

/// destroy of a running domain → shutoff (destroyed), no ID, still defined.
pub fn case_domain_destroy(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let name = "conf-dom-destroy";
    guarded(conn, fx, Made::domains(&[name]), || {
        let hv = conn.hypervisor();
        define_and_start(conn, fx, name)?;
        hv.destroy_domain(name).step("destroy")?;
        expect_state(
            conn,
            fx,
            name,
            DomainState::Shutoff,
            DomainReason::Destroyed,
        )?;
        ensure!(
            current_id(conn, name)?.is_none(),
            "a destroyed domain has no ID"
        );
        ensure!(
            hv.domain_is_persistent(name).step("is_persistent")?,
            "a destroyed persistent domain stays defined"
        );
        refused(
            "destroy again",
            hv.destroy_domain(name),
            Expected::InvalidState,
            &dom_label(name),
        )?;
        Ok(())
    })
}

/// destroy of a paused domain → shutoff (destroyed).
pub fn case_domain_destroy_paused(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let name = "conf-dom-destroy-paused";
    guarded(conn, fx, Made::domains(&[name]), || {
        let hv = conn.hypervisor();
        define_and_start(conn, fx, name)?;
        hv.suspend_domain(name).step("suspend")?;
        expect_state(conn, fx, name, DomainState::Paused, DomainReason::User)?;
        hv.destroy_domain(name).step("destroy of a paused domain")?;
        expect_state(
            conn,
            fx,
            name,
            DomainState::Shutoff,
            DomainReason::Destroyed,
        )?;
        ensure!(
            current_id(conn, name)?.is_none(),
            "a destroyed domain has no ID"
        );
        // It starts again, running (not paused).
        hv.start_domain(name).step("start after destroy")?;
        expect_state(conn, fx, name, DomainState::Running, DomainReason::Booted)?;
        Ok(())
    })
}

/// undefine of an active persistent domain → transient, still running and
/// listed; destroy → gone. Undefine of a transient domain → InvalidState.
pub fn case_domain_undefine_active(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let name = "conf-dom-undefine-active";
    guarded(conn, fx, Made::domains(&[name]), || {
        let hv = conn.hypervisor();
        let r = define_and_start(conn, fx, name)?;
        hv.undefine_domain(name)
            .step("undefine of a running domain")?;
        ensure!(
            !hv.domain_is_persistent(name)
                .step("is_persistent after undefine")?,
            "an undefined running domain is transient"
        );
        expect_state(conn, fx, name, DomainState::Running, DomainReason::Booted)?;
        ensure!(
            current_id(conn, name)? == r.id,
            "undefine keeps the running domain's ID"
        );
        expect_listed(
            "list Active",
            &domain_names(conn, ListFilter::Active)?,
            name,
            true,
        )?;
        refused(
            "undefine of a transient domain",
            hv.undefine_domain(name),
            Expected::InvalidState,
            &dom_label(name),
        )?;
        hv.destroy_domain(name)
            .step("destroy of the transient domain")?;
        wait_until_gone(conn, name, fx.timeout)?;
        refused(
            "lookup after destroy",
            hv.lookup_domain(Lookup::Name(name)),
            Expected::NotFound,
            &dom_label(name),
        )?;
        let uuid = parse_uuid("UUID", &r.uuid)?;
        refused(
            "lookup by UUID after destroy",
            hv.lookup_domain(Lookup::Uuid(uuid)),
            Expected::NotFound,
            &dom_label(&r.uuid),
        )?;
        expect_listed(
            "list All",
            &domain_names(conn, ListFilter::All)?,
            name,
            false,
        )?;
        Ok(())
    })
}

/// undefine of an inactive domain → gone; undefine again → NotFound.
pub fn case_domain_undefine_inactive(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let name = "conf-dom-undefine";
    guarded(conn, fx, Made::domains(&[name]), || {
        let hv = conn.hypervisor();
        define(conn, fx, name)?;
        hv.undefine_domain(name).step("undefine")?;
        refused(
            "lookup after undefine",
            hv.lookup_domain(Lookup::Name(name)),
            Expected::NotFound,
            &dom_label(name),
        )?;
        refused(
            "domain_info after undefine",
            hv.domain_info(name),
            Expected::NotFound,
            &dom_label(name),
        )?;
        refused(
            "undefine again",
            hv.undefine_domain(name),
            Expected::NotFound,
            &dom_label(name),
        )?;
        expect_listed(
            "list All",
            &domain_names(conn, ListFilter::All)?,
            name,
            false,
        )?;
        Ok(())
    })
}

/// create → transient and running with an ID; destroy → gone. A transient
/// domain that shuts down disappears too.
pub fn case_domain_create_transient(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let name = "conf-dom-create";
    guarded(conn, fx, Made::domains(&[name]), || {
        let hv = conn.hypervisor();
        let r = hv.create_domain(&fx.domain(name)).step("create")?;
        ensure!(r.name == name, "create returned {r:?}");
        expect_state(conn, fx, name, DomainState::Running, DomainReason::Booted)?;
        let Some(id) = r.id else {
            return Err(Failure::new(format!("create returned no ID: {r:?}")));
        };
        ensure!(
            !hv.domain_is_persistent(name).step("is_persistent")?,
            "a created domain is transient"
        );
        let by_id = hv.lookup_domain(Lookup::Id(id)).step("lookup by ID")?;
        ensure!(by_id.name == name, "ID {id} finds {by_id:?}");
        expect_listed(
            "list Active",
            &domain_names(conn, ListFilter::Active)?,
            name,
            true,
        )?;
        refused(
            "start of a transient running domain",
            hv.start_domain(name),
            Expected::InvalidState,
            &dom_label(name),
        )?;
        hv.destroy_domain(name).step("destroy")?;
        wait_until_gone(conn, name, fx.timeout)?;
        refused(
            "domain_state after destroy",
            hv.domain_state(name),
            Expected::NotFound,
            &dom_label(name),
        )?;
        refused(
            "lookup by old ID",
            hv.lookup_domain(Lookup::Id(id)),
            Expected::NotFound,
            &dom_label(&id.to_string()),
        )?;
        expect_listed(
            "list All",
            &domain_names(conn, ListFilter::All)?,
            name,
            false,
        )?;

        // Shutdown of a transient domain: it disappears when the guest is off.
        hv.create_domain(&fx.domain(name)).step("create again")?;
        expect_state(conn, fx, name, DomainState::Running, DomainReason::Booted)?;
        hv.shutdown_domain(name)
            .step("shutdown of a transient domain")?;
        wait_until_gone(conn, name, fx.timeout)?;
        Ok(())
    })
}

/// create with the name of an active domain → InvalidState (persistent or
/// transient), and the running domain is untouched.
pub fn case_domain_create_active_name(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let persistent = "conf-dom-create-dup";
    let transient = "conf-dom-create-dup-t";
    guarded(conn, fx, Made::domains(&[persistent, transient]), || {
        let hv = conn.hypervisor();
        let r = define_and_start(conn, fx, persistent)?;
        let mut again = fx.domain(persistent);
        again.spec.uuid = Some(r.uuid.clone());
        refused(
            "create with the name of a running persistent domain",
            hv.create_domain(&again),
            Expected::InvalidState,
            &dom_label(persistent),
        )?;
        ensure!(
            current_id(conn, persistent)? == r.id,
            "a refused create changed the running domain"
        );
        ensure!(
            hv.domain_is_persistent(persistent).step("is_persistent")?,
            "a refused create made it transient"
        );

        let t = hv
            .create_domain(&fx.domain(transient))
            .step("create transient")?;
        let mut again = fx.domain(transient);
        again.spec.uuid = Some(t.uuid.clone());
        refused(
            "create with the name of a running transient domain",
            hv.create_domain(&again),
            Expected::InvalidState,
            &dom_label(transient),
        )?;
        ensure!(
            current_id(conn, transient)? == t.id,
            "a refused create changed the running transient domain"
        );
        Ok(())
    })
}

/// create with the name (and UUID) of an inactive persistent domain runs the
/// new definition once: the domain stays persistent, its persistent
/// definition is unchanged and comes back when it stops.
pub fn case_domain_create_over_defined(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let name = "conf-dom-create-over";
    guarded(conn, fx, Made::domains(&[name]), || {
        let hv = conn.hypervisor();
        let r = define(conn, fx, name)?;
        let base = max_memory(conn, name, false)?;
        let mut live = fx.domain(name);
        live.spec.uuid = Some(r.uuid.clone());
        live.spec.memory = format_bytes(base * 2);
        let c = hv
            .create_domain(&live)
            .step("create over an inactive persistent domain")?;
        ensure!(c.uuid == r.uuid, "create changed the UUID: {c:?} vs {r:?}");
        ensure!(c.id.is_some(), "create returned no ID");
        expect_state(conn, fx, name, DomainState::Running, DomainReason::Booted)?;
        ensure!(
            hv.domain_is_persistent(name).step("is_persistent")?,
            "the domain keeps its persistent definition"
        );
        let now = max_memory(conn, name, false)?;
        ensure!(
            now == base * 2,
            "the live definition has memory {now}, expected {}",
            base * 2
        );
        let kept = max_memory(conn, name, true)?;
        ensure!(
            kept == base,
            "the persistent definition has memory {kept}, expected {base}"
        );
        hv.destroy_domain(name).step("destroy")?;
        expect_state(
            conn,
            fx,
            name,
            DomainState::Shutoff,
            DomainReason::Destroyed,
        )?;
        let back = max_memory(conn, name, false)?;
        ensure!(
            back == base,
            "after stopping, the definition has memory {back}, expected {base}"
        );
        Ok(())
    })
}

/// define over a running transient domain makes it persistent: it keeps
/// running the old definition, and the new one is live after a restart.
pub fn case_domain_define_transient(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let name = "conf-dom-define-transient";
    guarded(conn, fx, Made::domains(&[name]), || {
        let hv = conn.hypervisor();
        let r = hv.create_domain(&fx.domain(name)).step("create")?;
        expect_state(conn, fx, name, DomainState::Running, DomainReason::Booted)?;
        let base = max_memory(conn, name, false)?;
        let mut persistent = fx.domain(name);
        persistent.spec.uuid = Some(r.uuid.clone());
        persistent.spec.memory = format_bytes(base * 2);
        let d = hv
            .define_domain(&persistent)
            .step("define over a transient domain")?;
        ensure!(
            d.uuid == r.uuid && d.id == r.id,
            "define changed the running domain: {d:?} vs {r:?}"
        );
        ensure!(
            hv.domain_is_persistent(name).step("is_persistent")?,
            "a defined transient domain becomes persistent"
        );
        expect_state(conn, fx, name, DomainState::Running, DomainReason::Booted)?;
        let live = max_memory(conn, name, false)?;
        ensure!(
            live == base,
            "the live definition changed to {live} before a restart (expected {base})"
        );
        let next = max_memory(conn, name, true)?;
        ensure!(
            next == base * 2,
            "the inactive definition has memory {next}, expected {}",
            base * 2
        );
        hv.destroy_domain(name).step("destroy")?;
        expect_state(
            conn,
            fx,
            name,
            DomainState::Shutoff,
            DomainReason::Destroyed,
        )?;
        let kept = max_memory(conn, name, false)?;
        ensure!(
            kept == base * 2,
            "the domain stays defined with memory {}, but has {kept}",
            base * 2
        );
        Ok(())
    })
}

/// define with an existing name and another UUID → AlreadyExists; define of
/// another name with an existing UUID → AlreadyExists; create likewise.
pub fn case_domain_duplicate_uuid(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let first = "conf-dom-dup-a";
    let second = "conf-dom-dup-b";
    guarded(conn, fx, Made::domains(&[first, second]), || {
        let hv = conn.hypervisor();
        let r = define(conn, fx, first)?;
        let mut other_uuid = fx.domain(first);
        other_uuid.spec.uuid = Some(uuid::Uuid::new_v4().to_string());
        refused(
            "define of an existing name with another UUID",
            hv.define_domain(&other_uuid),
            Expected::AlreadyExists,
            &dom_label(first),
        )?;
        let now = hv.lookup_domain(Lookup::Name(first)).step("lookup")?;
        ensure!(
            now.uuid == r.uuid,
            "a refused define changed the UUID: {now:?} vs {r:?}"
        );

        let mut taken = fx.domain(second);
        taken.spec.uuid = Some(r.uuid.clone());
        let labels = [dom_label(first), dom_label(second)];
        let labels = [labels[0].as_str(), labels[1].as_str()];
        refused_any(
            "define of another name with an existing UUID",
            hv.define_domain(&taken),
            &[Expected::AlreadyExists],
            &labels,
        )?;
        refused_any(
            "create of another name with an existing UUID",
            hv.create_domain(&taken),
            &[Expected::AlreadyExists],
            &labels,
        )?;
        refused(
            "lookup of the refused name",
            hv.lookup_domain(Lookup::Name(second)),
            Expected::NotFound,
            &dom_label(second),
        )?;
        let uuid = parse_uuid("UUID", &r.uuid)?;
        let owner = hv
            .lookup_domain(Lookup::Uuid(uuid))
            .step("lookup by UUID")?;
        ensure!(owner.name == first, "the UUID now finds {owner:?}");

        // The same while the owner runs.
        hv.start_domain(first).step("start")?;
        expect_state(conn, fx, first, DomainState::Running, DomainReason::Booted)?;
        refused_any(
            "define of another name with the UUID of a running domain",
            hv.define_domain(&taken),
            &[Expected::AlreadyExists],
            &labels,
        )?;
        Ok(())
    })
}

/// define over a running domain: the new definition is the inactive one
/// until the domain stops, then it is live; redefine of an inactive domain
/// applies at once.
pub fn case_domain_redefine_running(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let name = "conf-dom-redefine";
    guarded(conn, fx, Made::domains(&[name]), || {
        let hv = conn.hypervisor();
        let r = define_and_start(conn, fx, name)?;
        let base = max_memory(conn, name, false)?;
        let mut bigger = fx.domain(name);
        bigger.spec.uuid = Some(r.uuid.clone());
        bigger.spec.memory = format_bytes(base * 2);
        let again = hv.define_domain(&bigger).step("redefine while running")?;
        ensure!(again.uuid == r.uuid, "redefine changed the UUID");
        ensure!(
            again.id == r.id,
            "redefine changed the running domain's ID: {again:?} vs {r:?}"
        );
        expect_state(conn, fx, name, DomainState::Running, DomainReason::Booted)?;
        let live = max_memory(conn, name, false)?;
        ensure!(
            live == base,
            "the live definition changed to {live} before a restart (expected {base})"
        );
        let next = max_memory(conn, name, true)?;
        ensure!(
            next == base * 2,
            "the inactive definition has memory {next}, expected {}",
            base * 2
        );
        let info = hv.domain_info(name).step("domain_info")?;
        let info_max = bytes_of("info.maxMemory", &info.max_memory)?;
        ensure!(
            info_max == base,
            "domain_info shows max memory {info_max} before a restart (expected {base})"
        );

        hv.destroy_domain(name).step("destroy")?;
        expect_state(
            conn,
            fx,
            name,
            DomainState::Shutoff,
            DomainReason::Destroyed,
        )?;
        let stopped = max_memory(conn, name, false)?;
        ensure!(
            stopped == base * 2,
            "after stopping, the definition has memory {stopped}, expected {}",
            base * 2
        );
        hv.start_domain(name).step("start")?;
        expect_state(conn, fx, name, DomainState::Running, DomainReason::Booted)?;
        let live = max_memory(conn, name, false)?;
        ensure!(
            live == base * 2,
            "after a restart the live definition has memory {live}, expected {}",
            base * 2
        );
        let info = hv.domain_info(name).step("domain_info")?;
        let info_max = bytes_of("info.maxMemory", &info.max_memory)?;
        ensure!(
            info_max == base * 2,
            "after a restart domain_info shows max memory {info_max}, expected {}",
            base * 2
        );

        hv.destroy_domain(name).step("destroy")?;
        expect_state(
            conn,
            fx,
            name,
            DomainState::Shutoff,
            DomainReason::Destroyed,
        )?;
        let mut original = fx.domain(name);
        original.spec.uuid = Some(r.uuid.clone());
        hv.define_domain(&original)
            .step("redefine while inactive")?;
        let now = max_memory(conn, name, false)?;
        ensure!(
            now == base,
            "redefining an inactive domain applies at once, but memory is {now} (expected {base})"
        );
        let info = hv.domain_info(name).step("domain_info")?;
        let info_max = bytes_of("info.maxMemory", &info.max_memory)?;
        ensure!(
            info_max == base,
            "domain_info shows max memory {info_max} after an inactive redefine (expected {base})"
        );
        Ok(())
    })
}

/// list filters (All, Active, Inactive) return the right domains with IDs
/// exactly on active ones, and counts agree with list lengths.
pub fn case_domain_list_filters(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let stopped = "conf-dom-list-off";
    let running = "conf-dom-list-on";
    guarded(conn, fx, Made::domains(&[stopped, running]), || {
        let hv = conn.hypervisor();
        define(conn, fx, stopped)?;
        define_and_start(conn, fx, running)?;
        let all = domain_names(conn, ListFilter::All)?;
        let active = domain_names(conn, ListFilter::Active)?;
        let inactive = domain_names(conn, ListFilter::Inactive)?;
        expect_listed("All", &all, stopped, true)?;
        expect_listed("All", &all, running, true)?;
        expect_listed("Active", &active, running, true)?;
        expect_listed("Active", &active, stopped, false)?;
        expect_listed("Inactive", &inactive, stopped, true)?;
        expect_listed("Inactive", &inactive, running, false)?;
        for d in hv.list_domains(ListFilter::Active).step("list Active")? {
            ensure!(
                d.id.is_some(),
                "an active domain is listed without an ID: {d:?}"
            );
        }
        for d in hv
            .list_domains(ListFilter::Inactive)
            .step("list Inactive")?
        {
            ensure!(
                d.id.is_none(),
                "an inactive domain is listed with an ID: {d:?}"
            );
        }
        for filter in [ListFilter::All, ListFilter::Active, ListFilter::Inactive] {
            counts_agree(
                &format!("domains {filter:?}"),
                || Ok(hv.list_domains(filter).step("list_domains")?.len()),
                || hv.count_domains(filter).step("count_domains"),
            )?;
        }
        all_is_active_plus_inactive("domains", |f| hv.count_domains(f).step("count_domains"))?;
        Ok(())
    })
}

/// lookups of an unknown name, UUID or ID → NotFound naming it; every
/// operation on an unknown name → NotFound naming it.
pub fn case_domain_lookup_unknown(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let name = "conf-dom-missing";
    guarded(conn, fx, Made::domains(&[name]), || {
        let hv = conn.hypervisor();
        let label = dom_label(name);
        refused(
            "lookup by name",
            hv.lookup_domain(Lookup::Name(name)),
            Expected::NotFound,
            &label,
        )?;
        let uuid = uuid::Uuid::new_v4();
        refused(
            "lookup by UUID",
            hv.lookup_domain(Lookup::Uuid(uuid)),
            Expected::NotFound,
            &dom_label(&uuid.to_string()),
        )?;
        let id = unused_domain_id(conn)?;
        refused(
            "lookup by ID",
            hv.lookup_domain(Lookup::Id(id)),
            Expected::NotFound,
            &dom_label(&id.to_string()),
        )?;
        refused(
            "domain_info",
            hv.domain_info(name),
            Expected::NotFound,
            &label,
        )?;
        refused(
            "domain_state",
            hv.domain_state(name),
            Expected::NotFound,
            &label,
        )?;
        refused(
            "domain_definition",
            hv.domain_definition(name, false),
            Expected::NotFound,
            &label,
        )?;
        refused(
            "domain_is_persistent",
            hv.domain_is_persistent(name),
            Expected::NotFound,
            &label,
        )?;
        refused(
            "domain_autostart",
            hv.domain_autostart(name),
            Expected::NotFound,
            &label,
        )?;
        refused(
            "set_domain_autostart",
            hv.set_domain_autostart(name, true),
            Expected::NotFound,
            &label,
        )?;
        refused(
            "set_domain_memory",
            hv.set_domain_memory(name, 256 * MIB),
            Expected::NotFound,
            &label,
        )?;
        refused(
            "set_domain_vcpus",
            hv.set_domain_vcpus(name, 1),
            Expected::NotFound,
            &label,
        )?;
        refused(
            "undefine",
            hv.undefine_domain(name),
            Expected::NotFound,
            &label,
        )?;
        for op in [
            DomOp::Start,
            DomOp::Shutdown,
            DomOp::Suspend,
            DomOp::Resume,
            DomOp::Reboot,
            DomOp::Reset,
            DomOp::Destroy,
        ] {
            refused(
                &format!("{op:?}"),
                domain_op(conn, op, name),
                Expected::NotFound,
                &label,
            )?;
        }
        Ok(())
    })
}

/// set_domain_memory: above the maximum → InvalidArgument; within → shown
/// by domain_info, in the definition while inactive, live only while active.
pub fn case_domain_memory(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let name = "conf-dom-memory";
    guarded(conn, fx, Made::domains(&[name]), || {
        let hv = conn.hypervisor();
        define(conn, fx, name)?;
        let label = dom_label(name);
        let info = hv.domain_info(name).step("domain_info")?;
        let max = bytes_of("info.maxMemory", &info.max_memory)?;
        ensure!(
            max >= 4 * MIB,
            "the fixture's domain has only {max} bytes of memory"
        );
        refused(
            "set_domain_memory above the maximum (inactive)",
            hv.set_domain_memory(name, max + MIB),
            Expected::InvalidArgument,
            &label,
        )?;
        let config = (max / 2) / MIB * MIB;
        hv.set_domain_memory(name, config)
            .step("set_domain_memory (inactive)")?;
        let memory_now = || -> Result<u64, Failure> {
            let info = hv.domain_info(name).step("domain_info")?;
            bytes_of("info.memory", &info.memory)
        };
        ensure!(
            memory_now()? == config,
            "domain_info does not show memory {config} set while inactive"
        );
        let def = hv.domain_definition(name, true).step("definition")?;
        let def_current = match &def.spec.current_memory {
            Some(q) => bytes_of("spec.currentMemory", q)?,
            None => bytes_of("spec.memory", &def.spec.memory)?,
        };
        ensure!(
            def_current == config,
            "the definition's currentMemory is {def_current}, expected {config}"
        );
        let info_max = bytes_of(
            "info.maxMemory",
            &hv.domain_info(name).step("domain_info")?.max_memory,
        )?;
        ensure!(
            info_max == max,
            "set_domain_memory changed the maximum to {info_max}"
        );

        hv.start_domain(name).step("start")?;
        expect_state(conn, fx, name, DomainState::Running, DomainReason::Booted)?;
        wait_for_value("memory after start", fx.timeout, &config, memory_now)?;
        refused(
            "set_domain_memory above the maximum (running)",
            hv.set_domain_memory(name, max + MIB),
            Expected::InvalidArgument,
            &label,
        )?;
        let live = (max / 4) / MIB * MIB;
        hv.set_domain_memory(name, live)
            .step("set_domain_memory (running)")?;
        wait_for_value("memory after a live change", fx.timeout, &live, memory_now)?;
        hv.destroy_domain(name).step("destroy")?;
        expect_state(
            conn,
            fx,
            name,
            DomainState::Shutoff,
            DomainReason::Destroyed,
        )?;
        ensure!(
            memory_now()? == config,
            "a live memory change must not outlive the activation: memory is {}, expected {config}",
            memory_now()?
        );
        Ok(())
    })
}

/// set_domain_vcpus: above maxVcpus or zero → InvalidArgument; within →
/// shown by domain_info, in the definition while inactive, live only while active.
pub fn case_domain_vcpus(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let name = "conf-dom-vcpus";
    guarded(conn, fx, Made::domains(&[name]), || {
        let hv = conn.hypervisor();
        define(conn, fx, name)?;
        let label = dom_label(name);
        let def = hv.domain_definition(name, true).step("definition")?;
        let max = def.spec.max_vcpus.unwrap_or(def.spec.vcpus);
        let vcpus_now =
            || -> Result<u32, Failure> { Ok(hv.domain_info(name).step("domain_info")?.vcpus) };
        refused(
            "set_domain_vcpus above maxVcpus",
            hv.set_domain_vcpus(name, max + 1),
            Expected::InvalidArgument,
            &label,
        )?;
        refused(
            "set_domain_vcpus to 0",
            hv.set_domain_vcpus(name, 0),
            Expected::InvalidArgument,
            &label,
        )?;
        hv.set_domain_vcpus(name, max)
            .step("set_domain_vcpus (inactive)")?;
        ensure!(
            vcpus_now()? == max,
            "domain_info shows {} vCPUs, expected {max}",
            vcpus_now()?
        );
        let def = hv.domain_definition(name, true).step("definition")?;
        ensure!(
            def.spec.vcpus == max,
            "the definition has {} vCPUs, expected {max}",
            def.spec.vcpus
        );

        hv.start_domain(name).step("start")?;
        expect_state(conn, fx, name, DomainState::Running, DomainReason::Booted)?;
        ensure!(
            vcpus_now()? == max,
            "the domain started with {} vCPUs, expected {max}",
            vcpus_now()?
        );
        refused(
            "set_domain_vcpus above maxVcpus (running)",
            hv.set_domain_vcpus(name, max + 1),
            Expected::InvalidArgument,
            &label,
        )?;
        hv.set_domain_vcpus(name, 1)
            .step("set_domain_vcpus (running)")?;
        wait_for_value("vCPUs after a live change", fx.timeout, &1, vcpus_now)?;
        hv.destroy_domain(name).step("destroy")?;
        expect_state(
            conn,
            fx,
            name,
            DomainState::Shutoff,
            DomainReason::Destroyed,
        )?;
        ensure!(
            vcpus_now()? == max,
            "a live vCPU change must not outlive the activation: {} vCPUs, expected {max}",
            vcpus_now()?
        );
        Ok(())
    })
}

/// Live memory and vCPU changes of a shut-off domain are refused
/// (InvalidState, as libvirt refuses `virsh setmem` without `--config`) and
/// change nothing; config changes go to the definition.
pub fn case_domain_live_change_inactive(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let name = "conf-dom-live-inactive";
    guarded(conn, fx, Made::domains(&[name]), || {
        let hv = conn.hypervisor();
        define(conn, fx, name)?;
        let label = dom_label(name);
        let before = hv.domain_definition(name, true).step("definition")?;
        let max = bytes_of("spec.memory", &before.spec.memory)?;
        refused(
            "set_domain_memory_flags(Live) of a shut-off domain",
            hv.set_domain_memory_flags(name, max / 2, crate::Affect::Live),
            Expected::InvalidState,
            &label,
        )?;
        refused(
            "set_domain_vcpus_flags(Live) of a shut-off domain",
            hv.set_domain_vcpus_flags(name, 1, crate::Affect::Live),
            Expected::InvalidState,
            &label,
        )?;
        let after = hv.domain_definition(name, true).step("definition")?;
        ensure!(
            after.spec == before.spec,
            "a refused live change changed the definition"
        );
        let config = (max / 2) / MIB * MIB;
        hv.set_domain_memory_flags(name, config, crate::Affect::Config)
            .step("set_domain_memory_flags(Config) of a shut-off domain")?;
        let info = hv.domain_info(name).step("domain_info")?;
        ensure!(
            bytes_of("info.memory", &info.memory)? == config,
            "a config change of a shut-off domain is not its memory"
        );
        expect_state(conn, fx, name, DomainState::Shutoff, DomainReason::Unknown)?;
        Ok(())
    })
}

/// autostart set and read on a persistent domain; refused (InvalidState) on
/// a transient one, including a persistent domain undefined while running.
pub fn case_domain_autostart(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let name = "conf-dom-autostart";
    let transient = "conf-dom-autostart-t";
    guarded(conn, fx, Made::domains(&[name, transient]), || {
        let hv = conn.hypervisor();
        define(conn, fx, name)?;
        ensure!(
            !hv.domain_autostart(name).step("autostart")?,
            "autostart starts off"
        );
        hv.set_domain_autostart(name, true).step("set autostart")?;
        ensure!(
            hv.domain_autostart(name).step("autostart")?,
            "autostart was set"
        );
        hv.set_domain_autostart(name, false)
            .step("clear autostart")?;
        ensure!(
            !hv.domain_autostart(name).step("autostart")?,
            "autostart was cleared"
        );
        hv.set_domain_autostart(name, true).step("set autostart")?;
        hv.start_domain(name).step("start")?;
        expect_state(conn, fx, name, DomainState::Running, DomainReason::Booted)?;
        ensure!(
            hv.domain_autostart(name).step("autostart")?,
            "starting keeps autostart"
        );
        hv.undefine_domain(name).step("undefine while running")?;
        ensure!(
            !hv.domain_autostart(name).step("autostart after undefine")?,
            "an undefined domain does not autostart"
        );
        refused(
            "set autostart on an undefined running domain",
            hv.set_domain_autostart(name, true),
            Expected::InvalidState,
            &dom_label(name),
        )?;

        hv.create_domain(&fx.domain(transient)).step("create")?;
        refused(
            "set autostart on a transient domain",
            hv.set_domain_autostart(transient, true),
            Expected::InvalidState,
            &dom_label(transient),
        )?;
        ensure!(
            !hv.domain_autostart(transient).step("autostart")?,
            "a transient domain does not autostart"
        );
        Ok(())
    })
}

/// Invalid specs → InvalidArgument naming the domain and the field; nothing
/// is defined.
pub fn case_domain_invalid_spec(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let name = "conf-dom-invalid";
    guarded(conn, fx, Made::domains(&[name]), || {
        let hv = conn.hypervisor();
        let label = dom_label(name);
        let base = fx.domain(name);
        let memory = bytes_of("spec.memory", &base.spec.memory)?;
        let mut cases: Vec<(&str, Domain)> = Vec::new();
        let mut d = base.clone();
        d.spec.current_memory = Some(format_bytes(memory + MIB));
        cases.push(("spec.currentMemory", d));
        let mut d = base.clone();
        d.spec.vcpus = 0;
        cases.push(("spec.vcpus", d));
        let mut d = base.clone();
        d.spec.vcpus = 2;
        d.spec.max_vcpus = Some(1);
        cases.push(("spec.maxVcpus", d));
        let mut d = base.clone();
        d.spec.memory = Quantity("0".into());
        d.spec.current_memory = None;
        cases.push(("spec.memory", d));
        let mut d = base.clone();
        d.spec.uuid = Some("not-a-uuid".into());
        cases.push(("spec.uuid", d));
        for (field, d) in &cases {
            for (verb, result) in [
                ("define", hv.define_domain(d)),
                ("create", hv.create_domain(d)),
            ] {
                let e = refused(
                    &format!("{verb} with a bad {field}"),
                    result,
                    Expected::InvalidArgument,
                    &label,
                )?;
                ensure!(
                    e.to_string().contains(field),
                    "the error should name the field {field}: \"{e}\""
                );
                refused(
                    &format!("lookup after a refused {verb}"),
                    hv.lookup_domain(Lookup::Name(name)),
                    Expected::NotFound,
                    &label,
                )?;
            }
        }
        let mut nameless = base.clone();
        nameless.metadata.name = None;
        let e = refused(
            "define without a name",
            hv.define_domain(&nameless),
            Expected::InvalidArgument,
            "domain",
        )?;
        ensure!(
            e.to_string().contains("metadata.name"),
            "the error should name metadata.name: \"{e}\""
        );

        // An invalid redefine leaves the valid definition in place.
        let r = define(conn, fx, name)?;
        let (_, bad) = &cases[0];
        let mut bad = bad.clone();
        bad.spec.uuid = Some(r.uuid.clone());
        refused(
            "redefine with a bad spec",
            hv.define_domain(&bad),
            Expected::InvalidArgument,
            &label,
        )?;
        let now = max_memory(conn, name, true)?;
        ensure!(
            now == memory,
            "a refused redefine changed the definition (memory {now}, expected {memory})"
        );
        Ok(())
    })
}

/// lifecycle.onReboot = destroy: a reboot ends shutoff (shutdown).
pub fn case_domain_on_reboot_destroy(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let name = "conf-dom-on-reboot";
    guarded(conn, fx, Made::domains(&[name]), || {
        let hv = conn.hypervisor();
        let mut d = fx.domain(name);
        d.spec.lifecycle.on_reboot = LifecycleAction::Destroy;
        hv.define_domain(&d).step("define")?;
        hv.start_domain(name).step("start")?;
        expect_state(conn, fx, name, DomainState::Running, DomainReason::Booted)?;
        hv.reboot_domain(name).step("reboot")?;
        expect_state(conn, fx, name, DomainState::Shutoff, DomainReason::Shutdown)?;
        ensure!(
            current_id(conn, name)?.is_none(),
            "the domain stopped, it has no ID"
        );
        ensure!(
            hv.domain_is_persistent(name).step("is_persistent")?,
            "the domain stays defined"
        );
        Ok(())
    })
}

/// lifecycle.onPoweroff = restart: a shutdown leaves the domain running;
/// destroy still stops it (destroyed).
pub fn case_domain_on_poweroff_restart(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let name = "conf-dom-on-poweroff";
    guarded(conn, fx, Made::domains(&[name]), || {
        let hv = conn.hypervisor();
        let mut d = fx.domain(name);
        d.spec.lifecycle.on_poweroff = LifecycleAction::Restart;
        hv.define_domain(&d).step("define")?;
        hv.start_domain(name).step("start")?;
        expect_state(conn, fx, name, DomainState::Running, DomainReason::Booted)?;
        hv.shutdown_domain(name).step("shutdown")?;
        wait_for_state(conn, name, DomainState::Running, fx.timeout)?;
        ensure!(
            current_id(conn, name)?.is_some(),
            "a restarted domain is active and has an ID"
        );
        hv.destroy_domain(name).step("destroy")?;
        expect_state(
            conn,
            fx,
            name,
            DomainState::Shutoff,
            DomainReason::Destroyed,
        )?;
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// Network cases
// ---------------------------------------------------------------------------

fn define_network(
    conn: &Connection,
    fx: &Fixture,
    name: &str,
) -> Result<crate::NetworkRef, Failure> {
    let r = conn
        .network()
        .define_network(&fx.network(name))
        .step(&format!("define network '{name}'"))?;
    ensure!(r.name == name, "define of network '{name}' returned {r:?}");
    Ok(r)
}

fn expect_network(
    conn: &Connection,
    name: &str,
    active: bool,
    persistent: bool,
) -> Result<(), Failure> {
    let info = conn
        .network()
        .network_info(name)
        .step(&format!("network_info '{name}'"))?;
    ensure!(
        info.active == active && info.persistent == persistent,
        "network '{name}' is active: {}, persistent: {}; expected active: {active}, persistent: {persistent}",
        info.active,
        info.persistent
    );
    Ok(())
}

/// define → inactive, persistent; start → active; start again →
/// InvalidState; destroy → inactive; destroy again → InvalidState;
/// undefine → gone.
pub fn case_network_lifecycle(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let name = "conf-net-life";
    guarded(conn, fx, Made::networks(&[name]), || {
        let n = conn.network();
        let label = net_label(name);
        let r = define_network(conn, fx, name)?;
        expect_network(conn, name, false, true)?;
        let info = n.network_info(name).step("network_info")?;
        ensure!(!info.autostart, "a defined network does not autostart");
        ensure!(
            info.uuid == r.uuid && info.name == name,
            "network_info {info:?} does not match {r:?}"
        );
        expect_listed(
            "Inactive",
            &network_names(conn, ListFilter::Inactive)?,
            name,
            true,
        )?;
        expect_listed(
            "Active",
            &network_names(conn, ListFilter::Active)?,
            name,
            false,
        )?;
        n.start_network(name).step("start")?;
        expect_network(conn, name, true, true)?;
        expect_listed(
            "Active",
            &network_names(conn, ListFilter::Active)?,
            name,
            true,
        )?;
        refused(
            "start of an active network",
            n.start_network(name),
            Expected::InvalidState,
            &label,
        )?;
        expect_network(conn, name, true, true)?;
        n.destroy_network(name).step("destroy")?;
        expect_network(conn, name, false, true)?;
        refused(
            "destroy of an inactive network",
            n.destroy_network(name),
            Expected::InvalidState,
            &label,
        )?;
        n.undefine_network(name).step("undefine")?;
        refused(
            "lookup after undefine",
            n.lookup_network(Lookup::Name(name)),
            Expected::NotFound,
            &label,
        )?;
        refused(
            "network_info after undefine",
            n.network_info(name),
            Expected::NotFound,
            &label,
        )?;
        refused(
            "undefine again",
            n.undefine_network(name),
            Expected::NotFound,
            &label,
        )?;
        refused(
            "start after undefine",
            n.start_network(name),
            Expected::NotFound,
            &label,
        )?;
        Ok(())
    })
}

/// undefine of an active network → transient, still active; destroy → gone.
pub fn case_network_undefine_active(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let name = "conf-net-undef-active";
    guarded(conn, fx, Made::networks(&[name]), || {
        let n = conn.network();
        let label = net_label(name);
        define_network(conn, fx, name)?;
        n.start_network(name).step("start")?;
        n.undefine_network(name)
            .step("undefine of an active network")?;
        expect_network(conn, name, true, false)?;
        expect_listed(
            "Active",
            &network_names(conn, ListFilter::Active)?,
            name,
            true,
        )?;
        refused(
            "undefine of a transient network",
            n.undefine_network(name),
            Expected::InvalidState,
            &label,
        )?;
        n.destroy_network(name).step("destroy")?;
        refused(
            "lookup after destroy",
            n.lookup_network(Lookup::Name(name)),
            Expected::NotFound,
            &label,
        )?;
        expect_listed("All", &network_names(conn, ListFilter::All)?, name, false)?;
        Ok(())
    })
}

/// create → transient and active; autostart and undefine → InvalidState;
/// create again → InvalidState; destroy → gone.
pub fn case_network_transient(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let name = "conf-net-transient";
    guarded(conn, fx, Made::networks(&[name]), || {
        let n = conn.network();
        let label = net_label(name);
        let r = n.create_network(&fx.network(name)).step("create")?;
        ensure!(r.name == name, "create returned {r:?}");
        expect_network(conn, name, true, false)?;
        let uuid = parse_uuid("UUID", &r.uuid)?;
        let by_uuid = n
            .lookup_network(Lookup::Uuid(uuid))
            .step("lookup by UUID")?;
        ensure!(
            by_uuid == r,
            "lookup by UUID gave {by_uuid:?}, create gave {r:?}"
        );
        refused(
            "autostart of a transient network",
            n.set_network_autostart(name, true),
            Expected::InvalidState,
            &label,
        )?;
        refused(
            "undefine of a transient network",
            n.undefine_network(name),
            Expected::InvalidState,
            &label,
        )?;
        let mut again = fx.network(name);
        again.spec.uuid = Some(r.uuid.clone());
        refused(
            "create of an active name",
            n.create_network(&again),
            Expected::InvalidState,
            &label,
        )?;
        refused(
            "start of an active network",
            n.start_network(name),
            Expected::InvalidState,
            &label,
        )?;
        n.destroy_network(name).step("destroy")?;
        refused(
            "lookup after destroy",
            n.lookup_network(Lookup::Name(name)),
            Expected::NotFound,
            &label,
        )?;
        refused(
            "lookup by UUID after destroy",
            n.lookup_network(Lookup::Uuid(uuid)),
            Expected::NotFound,
            &net_label(&r.uuid),
        )?;
        Ok(())
    })
}

/// define over an active transient network makes it persistent; it stays
/// defined after destroy.
pub fn case_network_define_transient(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let name = "conf-net-define-transient";
    guarded(conn, fx, Made::networks(&[name]), || {
        let n = conn.network();
        let r = n.create_network(&fx.network(name)).step("create")?;
        let mut persistent = fx.network(name);
        persistent.spec.uuid = Some(r.uuid.clone());
        let d = n
            .define_network(&persistent)
            .step("define over a transient network")?;
        ensure!(d == r, "define changed the network: {d:?} vs {r:?}");
        expect_network(conn, name, true, true)?;
        n.destroy_network(name).step("destroy")?;
        expect_network(conn, name, false, true)?;
        Ok(())
    })
}

/// create with the name of an inactive persistent network runs it once; it
/// stays persistent and inactive after destroy.
pub fn case_network_create_over_defined(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let name = "conf-net-create-over";
    guarded(conn, fx, Made::networks(&[name]), || {
        let n = conn.network();
        let r = define_network(conn, fx, name)?;
        let mut live = fx.network(name);
        live.spec.uuid = Some(r.uuid.clone());
        let c = n
            .create_network(&live)
            .step("create over a defined network")?;
        ensure!(c.uuid == r.uuid, "create changed the UUID");
        expect_network(conn, name, true, true)?;
        n.destroy_network(name).step("destroy")?;
        expect_network(conn, name, false, true)?;
        Ok(())
    })
}

/// define over an active network: the new definition waits for the next start.
pub fn case_network_redefine_active(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let name = "conf-net-redefine";
    guarded(conn, fx, Made::networks(&[name]), || {
        let n = conn.network();
        let r = define_network(conn, fx, name)?;
        n.start_network(name).step("start")?;
        let old = n
            .network_definition(name, false)
            .step("definition")?
            .spec
            .forward_mode;
        let new = if old == ForwardMode::Isolated {
            ForwardMode::Nat
        } else {
            ForwardMode::Isolated
        };
        let mut next = fx.network(name);
        next.spec.uuid = Some(r.uuid.clone());
        next.spec.forward_mode = new;
        let again = n.define_network(&next).step("redefine while active")?;
        ensure!(again.uuid == r.uuid, "redefine changed the UUID");
        expect_network(conn, name, true, true)?;
        let live = n
            .network_definition(name, false)
            .step("live definition")?
            .spec
            .forward_mode;
        ensure!(
            live == old,
            "the live definition changed to {live} before a restart (expected {old})"
        );
        let pending = n
            .network_definition(name, true)
            .step("inactive definition")?
            .spec
            .forward_mode;
        ensure!(
            pending == new,
            "the inactive definition has forward mode {pending}, expected {new}"
        );
        n.destroy_network(name).step("destroy")?;
        n.start_network(name).step("start")?;
        let live = n
            .network_definition(name, false)
            .step("live definition")?
            .spec
            .forward_mode;
        ensure!(
            live == new,
            "after a restart the forward mode is {live}, expected {new}"
        );
        Ok(())
    })
}

/// autostart set and read on a persistent network.
pub fn case_network_autostart(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let name = "conf-net-autostart";
    guarded(conn, fx, Made::networks(&[name]), || {
        let n = conn.network();
        define_network(conn, fx, name)?;
        n.set_network_autostart(name, true).step("set autostart")?;
        ensure!(
            n.network_info(name).step("info")?.autostart,
            "autostart was set"
        );
        n.set_network_autostart(name, false)
            .step("clear autostart")?;
        ensure!(
            !n.network_info(name).step("info")?.autostart,
            "autostart was cleared"
        );
        n.set_network_autostart(name, true).step("set autostart")?;
        n.start_network(name).step("start")?;
        n.undefine_network(name).step("undefine while active")?;
        let info = n.network_info(name).step("info")?;
        ensure!(!info.autostart, "an undefined network does not autostart");
        refused(
            "autostart of an undefined active network",
            n.set_network_autostart(name, true),
            Expected::InvalidState,
            &net_label(name),
        )?;
        Ok(())
    })
}

/// lookups by name and UUID find the network; unknown ones → NotFound naming them.
pub fn case_network_lookup(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let name = "conf-net-lookup";
    let missing = "conf-net-missing";
    guarded(conn, fx, Made::networks(&[name, missing]), || {
        let n = conn.network();
        let r = define_network(conn, fx, name)?;
        let by_name = n
            .lookup_network(Lookup::Name(name))
            .step("lookup by name")?;
        ensure!(
            by_name == r,
            "lookup by name gave {by_name:?}, define gave {r:?}"
        );
        let uuid = parse_uuid("UUID", &r.uuid)?;
        let by_uuid = n
            .lookup_network(Lookup::Uuid(uuid))
            .step("lookup by UUID")?;
        ensure!(
            by_uuid == r,
            "lookup by UUID gave {by_uuid:?}, define gave {r:?}"
        );
        let def = n.network_definition(name, false).step("definition")?;
        ensure!(
            def.spec.uuid.as_deref().map(str::to_ascii_lowercase)
                == Some(r.uuid.to_ascii_lowercase()),
            "the definition carries UUID {:?}, the reference {}",
            def.spec.uuid,
            r.uuid
        );
        let label = net_label(missing);
        refused(
            "lookup of an unknown name",
            n.lookup_network(Lookup::Name(missing)),
            Expected::NotFound,
            &label,
        )?;
        let unknown = uuid::Uuid::new_v4();
        refused(
            "lookup of an unknown UUID",
            n.lookup_network(Lookup::Uuid(unknown)),
            Expected::NotFound,
            &net_label(&unknown.to_string()),
        )?;
        refused(
            "network_info",
            n.network_info(missing),
            Expected::NotFound,
            &label,
        )?;
        refused(
            "network_definition",
            n.network_definition(missing, false),
            Expected::NotFound,
            &label,
        )?;
        refused(
            "start",
            n.start_network(missing),
            Expected::NotFound,
            &label,
        )?;
        refused(
            "destroy",
            n.destroy_network(missing),
            Expected::NotFound,
            &label,
        )?;
        refused(
            "undefine",
            n.undefine_network(missing),
            Expected::NotFound,
            &label,
        )?;
        refused(
            "autostart",
            n.set_network_autostart(missing, true),
            Expected::NotFound,
            &label,
        )?;
        Ok(())
    })
}

/// AlreadyExists when a name would change UUID or a UUID would change name.
pub fn case_network_duplicate_uuid(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let first = "conf-net-dup-a";
    let second = "conf-net-dup-b";
    guarded(conn, fx, Made::networks(&[first, second]), || {
        let n = conn.network();
        let r = define_network(conn, fx, first)?;
        let mut other = fx.network(first);
        other.spec.uuid = Some(uuid::Uuid::new_v4().to_string());
        refused(
            "define of an existing name with another UUID",
            n.define_network(&other),
            Expected::AlreadyExists,
            &net_label(first),
        )?;
        let labels = [net_label(first), net_label(second)];
        let labels = [labels[0].as_str(), labels[1].as_str()];
        let mut taken = fx.network(second);
        taken.spec.uuid = Some(r.uuid.clone());
        refused_any(
            "define of another name with an existing UUID",
            n.define_network(&taken),
            &[Expected::AlreadyExists],
            &labels,
        )?;
        refused_any(
            "create of another name with an existing UUID",
            n.create_network(&taken),
            &[Expected::AlreadyExists],
            &labels,
        )?;
        refused(
            "lookup of the refused name",
            n.lookup_network(Lookup::Name(second)),
            Expected::NotFound,
            &net_label(second),
        )?;
        let now = n.lookup_network(Lookup::Name(first)).step("lookup")?;
        ensure!(
            now == r,
            "a refused define changed the network: {now:?} vs {r:?}"
        );
        Ok(())
    })
}

/// list filters and counts for networks.
pub fn case_network_list_filters(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let stopped = "conf-net-list-off";
    let running = "conf-net-list-on";
    guarded(conn, fx, Made::networks(&[stopped, running]), || {
        let n = conn.network();
        define_network(conn, fx, stopped)?;
        define_network(conn, fx, running)?;
        n.start_network(running).step("start")?;
        let all = network_names(conn, ListFilter::All)?;
        let active = network_names(conn, ListFilter::Active)?;
        let inactive = network_names(conn, ListFilter::Inactive)?;
        expect_listed("All", &all, stopped, true)?;
        expect_listed("All", &all, running, true)?;
        expect_listed("Active", &active, running, true)?;
        expect_listed("Active", &active, stopped, false)?;
        expect_listed("Inactive", &inactive, stopped, true)?;
        expect_listed("Inactive", &inactive, running, false)?;
        for filter in [ListFilter::All, ListFilter::Active, ListFilter::Inactive] {
            counts_agree(
                &format!("networks {filter:?}"),
                || Ok(n.list_networks(filter).step("list_networks")?.len()),
                || n.count_networks(filter).step("count_networks"),
            )?;
        }
        all_is_active_plus_inactive("networks", |f| n.count_networks(f).step("count_networks"))?;
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// Pool cases
// ---------------------------------------------------------------------------

fn define_pool(conn: &Connection, fx: &Fixture, name: &str) -> Result<crate::PoolRef, Failure> {
    let r = conn
        .storage()
        .define_pool(&fx.pool(name))
        .step(&format!("define pool '{name}'"))?;
    ensure!(r.name == name, "define of pool '{name}' returned {r:?}");
    Ok(r)
}

/// Refreshes a running pool and reads its sizes.
fn pool_sizes(conn: &Connection, name: &str) -> Result<PoolInfo, Failure> {
    let st = conn.storage();
    st.refresh_pool(name)
        .step(&format!("refresh pool '{name}'"))?;
    let info = st.pool_info(name).step(&format!("pool_info '{name}'"))?;
    ensure!(
        info.state == PoolState::Running,
        "pool '{name}' is {}, expected running",
        info.state
    );
    ensure!(
        info.capacity > 0,
        "a running pool has a capacity, '{name}' reports 0"
    );
    // A filesystem keeps reserved blocks, so a real dir pool's allocation
    // and available space may add up to less than its capacity, never more.
    ensure!(
        info.allocation
            .checked_add(info.available)
            .is_some_and(|sum| sum <= info.capacity),
        "pool '{name}': allocation {} + available {} > capacity {}",
        info.allocation,
        info.available,
        info.capacity
    );
    Ok(info)
}

fn expect_pool_state(conn: &Connection, name: &str, state: PoolState) -> Result<(), Failure> {
    let info = conn
        .storage()
        .pool_info(name)
        .step(&format!("pool_info '{name}'"))?;
    ensure!(
        info.state == state,
        "pool '{name}' is {}, expected {state}",
        info.state
    );
    Ok(())
}

/// define → inactive; build ok; start → running with consistent sizes;
/// build, delete, undefine and start while running → InvalidState; destroy
/// → inactive; destroy again → InvalidState; delete ok; undefine → gone.
pub fn case_pool_lifecycle(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let name = "conf-pool-life";
    guarded(conn, fx, Made::pools(&[name]), || {
        let st = conn.storage();
        let label = pool_label(name);
        let r = define_pool(conn, fx, name)?;
        let info = st.pool_info(name).step("pool_info")?;
        ensure!(
            info.state == PoolState::Inactive,
            "a defined pool is inactive, '{name}' is {}",
            info.state
        );
        ensure!(
            info.persistent && !info.autostart,
            "a defined pool is persistent without autostart: {info:?}"
        );
        ensure!(
            info.uuid == r.uuid,
            "pool_info's UUID {} is not define's {}",
            info.uuid,
            r.uuid
        );
        expect_listed(
            "Inactive",
            &pool_names(conn, ListFilter::Inactive)?,
            name,
            true,
        )?;
        st.build_pool(name).step("build while inactive")?;
        expect_pool_state(conn, name, PoolState::Inactive)?;
        st.start_pool(name).step("start")?;
        pool_sizes(conn, name)?;
        expect_listed("Active", &pool_names(conn, ListFilter::Active)?, name, true)?;
        refused(
            "start of a running pool",
            st.start_pool(name),
            Expected::InvalidState,
            &label,
        )?;
        refused(
            "build of a running pool",
            st.build_pool(name),
            Expected::InvalidState,
            &label,
        )?;
        refused(
            "delete of a running pool",
            st.delete_pool(name),
            Expected::InvalidState,
            &label,
        )?;
        refused(
            "undefine of a running pool",
            st.undefine_pool(name),
            Expected::InvalidState,
            &label,
        )?;
        pool_sizes(conn, name)?;
        st.destroy_pool(name).step("destroy")?;
        expect_pool_state(conn, name, PoolState::Inactive)?;
        ensure!(
            st.pool_info(name).step("pool_info")?.persistent,
            "a stopped pool stays defined"
        );
        refused(
            "destroy of an inactive pool",
            st.destroy_pool(name),
            Expected::InvalidState,
            &label,
        )?;
        refused(
            "refresh of an inactive pool",
            st.refresh_pool(name),
            Expected::InvalidState,
            &label,
        )?;
        st.delete_pool(name)
            .step("delete while inactive and empty")?;
        st.undefine_pool(name).step("undefine")?;
        refused(
            "lookup after undefine",
            st.lookup_pool(Lookup::Name(name)),
            Expected::NotFound,
            &label,
        )?;
        refused(
            "pool_info after undefine",
            st.pool_info(name),
            Expected::NotFound,
            &label,
        )?;
        refused(
            "undefine again",
            st.undefine_pool(name),
            Expected::NotFound,
            &label,
        )?;
        Ok(())
    })
}

/// create → transient and running; autostart and undefine → InvalidState;
/// destroy → gone.
pub fn case_pool_transient(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let name = "conf-pool-transient";
    guarded(conn, fx, Made::pools(&[name]), || {
        let st = conn.storage();
        let label = pool_label(name);
        let r = st.create_pool(&fx.pool(name)).step("create")?;
        ensure!(r.name == name, "create returned {r:?}");
        let info = pool_sizes(conn, name)?;
        ensure!(!info.persistent, "a created pool is transient");
        refused(
            "autostart of a transient pool",
            st.set_pool_autostart(name, true),
            Expected::InvalidState,
            &label,
        )?;
        refused(
            "undefine of a running transient pool",
            st.undefine_pool(name),
            Expected::InvalidState,
            &label,
        )?;
        let mut again = fx.pool(name);
        again.spec.uuid = Some(r.uuid.clone());
        refused(
            "create of an active name",
            st.create_pool(&again),
            Expected::InvalidState,
            &label,
        )?;
        st.destroy_pool(name).step("destroy")?;
        refused(
            "lookup after destroy",
            st.lookup_pool(Lookup::Name(name)),
            Expected::NotFound,
            &label,
        )?;
        Ok(())
    })
}

/// define over a running transient pool makes it persistent; it stays
/// defined after destroy.
pub fn case_pool_define_transient(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let name = "conf-pool-define-transient";
    guarded(conn, fx, Made::pools(&[name]), || {
        let st = conn.storage();
        let r = st.create_pool(&fx.pool(name)).step("create")?;
        let mut persistent = fx.pool(name);
        persistent.spec.uuid = Some(r.uuid.clone());
        let d = st
            .define_pool(&persistent)
            .step("define over a transient pool")?;
        ensure!(d == r, "define changed the pool: {d:?} vs {r:?}");
        let info = pool_sizes(conn, name)?;
        ensure!(
            info.persistent,
            "a defined transient pool becomes persistent"
        );
        st.destroy_pool(name).step("destroy")?;
        expect_pool_state(conn, name, PoolState::Inactive)?;
        ensure!(
            st.pool_info(name).step("pool_info")?.persistent,
            "the pool stays defined after destroy"
        );
        Ok(())
    })
}

/// lookups by name and UUID; unknown ones → NotFound naming them.
pub fn case_pool_lookup(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let name = "conf-pool-lookup";
    let missing = "conf-pool-missing";
    guarded(conn, fx, Made::pools(&[name, missing]), || {
        let st = conn.storage();
        let r = define_pool(conn, fx, name)?;
        let by_name = st.lookup_pool(Lookup::Name(name)).step("lookup by name")?;
        ensure!(
            by_name == r,
            "lookup by name gave {by_name:?}, define gave {r:?}"
        );
        let uuid = parse_uuid("UUID", &r.uuid)?;
        let by_uuid = st.lookup_pool(Lookup::Uuid(uuid)).step("lookup by UUID")?;
        ensure!(
            by_uuid == r,
            "lookup by UUID gave {by_uuid:?}, define gave {r:?}"
        );
        let def = st.pool_definition(name).step("definition")?;
        ensure!(
            def.spec.uuid.as_deref().map(str::to_ascii_lowercase)
                == Some(r.uuid.to_ascii_lowercase()),
            "the definition carries UUID {:?}, the reference {}",
            def.spec.uuid,
            r.uuid
        );
        let label = pool_label(missing);
        refused(
            "lookup of an unknown name",
            st.lookup_pool(Lookup::Name(missing)),
            Expected::NotFound,
            &label,
        )?;
        let unknown = uuid::Uuid::new_v4();
        refused(
            "lookup of an unknown UUID",
            st.lookup_pool(Lookup::Uuid(unknown)),
            Expected::NotFound,
            &pool_label(&unknown.to_string()),
        )?;
        refused(
            "pool_info",
            st.pool_info(missing),
            Expected::NotFound,
            &label,
        )?;
        refused("start", st.start_pool(missing), Expected::NotFound, &label)?;
        refused("build", st.build_pool(missing), Expected::NotFound, &label)?;
        refused(
            "destroy",
            st.destroy_pool(missing),
            Expected::NotFound,
            &label,
        )?;
        refused(
            "delete",
            st.delete_pool(missing),
            Expected::NotFound,
            &label,
        )?;
        refused(
            "undefine",
            st.undefine_pool(missing),
            Expected::NotFound,
            &label,
        )?;
        refused(
            "list_volumes",
            st.list_volumes(missing),
            Expected::NotFound,
            &label,
        )?;
        Ok(())
    })
}

/// AlreadyExists when a pool name would change UUID or a UUID would change name.
pub fn case_pool_duplicate_uuid(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let first = "conf-pool-dup-a";
    let second = "conf-pool-dup-b";
    guarded(conn, fx, Made::pools(&[first, second]), || {
        let st = conn.storage();
        let r = define_pool(conn, fx, first)?;
        let mut other = fx.pool(first);
        other.spec.uuid = Some(uuid::Uuid::new_v4().to_string());
        refused(
            "define of an existing name with another UUID",
            st.define_pool(&other),
            Expected::AlreadyExists,
            &pool_label(first),
        )?;
        let labels = [pool_label(first), pool_label(second)];
        let labels = [labels[0].as_str(), labels[1].as_str()];
        let mut taken = fx.pool(second);
        taken.spec.uuid = Some(r.uuid.clone());
        refused_any(
            "define of another name with an existing UUID",
            st.define_pool(&taken),
            &[Expected::AlreadyExists],
            &labels,
        )?;
        refused_any(
            "create of another name with an existing UUID",
            st.create_pool(&taken),
            &[Expected::AlreadyExists],
            &labels,
        )?;
        refused(
            "lookup of the refused name",
            st.lookup_pool(Lookup::Name(second)),
            Expected::NotFound,
            &pool_label(second),
        )?;
        let now = st.lookup_pool(Lookup::Name(first)).step("lookup")?;
        ensure!(
            now == r,
            "a refused define changed the pool: {now:?} vs {r:?}"
        );
        Ok(())
    })
}

/// list filters and counts for pools.
pub fn case_pool_list_filters(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let stopped = "conf-pool-list-off";
    let running = "conf-pool-list-on";
    guarded(conn, fx, Made::pools(&[stopped, running]), || {
        let st = conn.storage();
        define_pool(conn, fx, stopped)?;
        define_pool(conn, fx, running)?;
        st.build_pool(running).step("build")?;
        st.start_pool(running).step("start")?;
        let all = pool_names(conn, ListFilter::All)?;
        let active = pool_names(conn, ListFilter::Active)?;
        let inactive = pool_names(conn, ListFilter::Inactive)?;
        expect_listed("All", &all, stopped, true)?;
        expect_listed("All", &all, running, true)?;
        expect_listed("Active", &active, running, true)?;
        expect_listed("Active", &active, stopped, false)?;
        expect_listed("Inactive", &inactive, stopped, true)?;
        expect_listed("Inactive", &inactive, running, false)?;
        for filter in [ListFilter::All, ListFilter::Active, ListFilter::Inactive] {
            counts_agree(
                &format!("pools {filter:?}"),
                || Ok(st.list_pools(filter).step("list_pools")?.len()),
                || st.count_pools(filter).step("count_pools"),
            )?;
        }
        all_is_active_plus_inactive("pools", |f| st.count_pools(f).step("count_pools"))?;
        Ok(())
    })
}

/// redefine while active: the running pool keeps its definition; the new
/// one (here a new path) takes effect at the next start.
pub fn case_pool_redefine_active(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let name = "conf-pool-redefine";
    guarded(conn, fx, Made::pools(&[name]), || {
        let st = conn.storage();
        let r = define_pool(conn, fx, name)?;
        st.build_pool(name).step("build")?;
        st.start_pool(name).step("start")?;
        let old = st.pool_definition(name).step("definition")?.spec.path;
        let mut next = fx.pool(name);
        next.spec.uuid = Some(r.uuid.clone());
        next.spec.path = format!("{}-next", old.trim_end_matches('/'));
        let again = st.define_pool(&next).step("redefine while active")?;
        ensure!(again.uuid == r.uuid, "redefine changed the UUID");
        let live = st.pool_definition(name).step("definition")?.spec.path;
        ensure!(
            live == old,
            "the running pool's path changed to {live} before a restart (expected {old})"
        );
        st.destroy_pool(name).step("destroy")?;
        let after = st.pool_definition(name).step("definition")?.spec.path;
        ensure!(
            after == next.spec.path,
            "after a stop the pool's path is {after}, expected {}",
            next.spec.path
        );
        st.build_pool(name).step("build the new path")?;
        st.start_pool(name).step("start")?;
        st.destroy_pool(name).step("destroy")?;
        st.delete_pool(name).step("delete the new path")?;
        Ok(())
    })
}

/// autostart set and read on a persistent pool.
pub fn case_pool_autostart(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let name = "conf-pool-autostart";
    guarded(conn, fx, Made::pools(&[name]), || {
        let st = conn.storage();
        define_pool(conn, fx, name)?;
        st.set_pool_autostart(name, true).step("set autostart")?;
        ensure!(
            st.pool_info(name).step("info")?.autostart,
            "autostart was set"
        );
        st.set_pool_autostart(name, false).step("clear autostart")?;
        ensure!(
            !st.pool_info(name).step("info")?.autostart,
            "autostart was cleared"
        );
        Ok(())
    })
}

/// Volume operations on an inactive pool → InvalidState naming the pool;
/// its volumes are hidden while it is stopped and come back when it starts.
pub fn case_pool_inactive_volume_ops(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let pool = "conf-pool-inactive-vols";
    let vol = "conf-vol-hidden";
    guarded(conn, fx, Made::pools(&[pool]), || {
        let st = conn.storage();
        let label = pool_label(pool);
        define_pool(conn, fx, pool)?;
        refused(
            "create_volume in a never-started pool",
            st.create_volume(&new_volume(pool, vol, MIB, None)),
            Expected::InvalidState,
            &label,
        )?;
        st.build_pool(pool).step("build")?;
        st.start_pool(pool).step("start")?;
        let unit = volume_unit(conn, pool)?;
        let r = st
            .create_volume(&new_volume(pool, vol, unit, Some(unit)))
            .step("create_volume")?;
        st.destroy_pool(pool).step("destroy")?;

        refused(
            "create_volume in an inactive pool",
            st.create_volume(&new_volume(pool, "conf-vol-other", unit, None)),
            Expected::InvalidState,
            &label,
        )?;
        refused(
            "list_volumes",
            st.list_volumes(pool),
            Expected::InvalidState,
            &label,
        )?;
        refused(
            "count_volumes",
            st.count_volumes(pool),
            Expected::InvalidState,
            &label,
        )?;
        refused(
            "lookup_volume",
            st.lookup_volume(pool, vol),
            Expected::InvalidState,
            &label,
        )?;
        refused(
            "volume_info",
            st.volume_info(pool, vol),
            Expected::InvalidState,
            &label,
        )?;
        refused(
            "resize_volume",
            st.resize_volume(pool, vol, 2 * unit, ResizeFlags::default()),
            Expected::InvalidState,
            &label,
        )?;
        refused(
            "wipe_volume",
            st.wipe_volume(pool, vol),
            Expected::InvalidState,
            &label,
        )?;
        refused(
            "delete_volume",
            st.delete_volume(pool, vol),
            Expected::InvalidState,
            &label,
        )?;
        refused(
            "lookup by path of a volume in an inactive pool",
            st.lookup_volume_by_path(&r.path),
            Expected::NotFound,
            &r.path,
        )?;
        // A dir pool's directory is not empty: delete is refused.
        refused_any(
            "delete of an inactive pool that holds a volume",
            st.delete_pool(pool),
            &[Expected::InvalidState, Expected::OperationFailed],
            &[&label],
        )?;

        st.start_pool(pool).step("start again")?;
        let vols = st.list_volumes(pool).step("list_volumes")?;
        ensure!(
            vols.iter().any(|v| v.name == vol),
            "a pool's volumes survive a stop, but the list is {vols:?}"
        );
        let info = st.volume_info(pool, vol).step("volume_info")?;
        ensure!(
            info.capacity == unit,
            "the volume's capacity changed across a pool restart: {info:?}"
        );
        st.delete_volume(pool, vol).step("delete_volume")?;
        st.destroy_pool(pool).step("destroy")?;
        st.delete_pool(pool)
            .step("delete of an empty inactive pool")?;
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// Volume cases
// ---------------------------------------------------------------------------

/// A raw volume of `capacity` bytes; `allocation` as given (None: the
/// driver's default).
fn new_volume(pool: &str, name: &str, capacity: u64, allocation: Option<u64>) -> StorageVol {
    StorageVol::new(
        name,
        StorageVolSpec {
            pool: pool.to_string(),
            capacity: format_bytes(capacity),
            allocation: allocation.map(format_bytes),
            format: VolFormat::Raw,
            source: None,
            node_name: None,
        },
    )
}

/// A volume size that fits the pool many times over: a sixteenth of the
/// free space, at most 64 MiB, in whole MiB.
fn volume_unit(conn: &Connection, pool: &str) -> Result<u64, Failure> {
    let info = pool_sizes(conn, pool)?;
    let unit = (info.available / 16).min(64 * MIB) / MIB * MIB;
    ensure!(
        unit >= MIB,
        "pool '{pool}' has only {} bytes free; the suite needs at least 16 MiB",
        info.available
    );
    Ok(unit)
}

/// Defines, builds and starts a pool, then runs `body` with a volume size
/// that fits; the pool and its volumes are removed afterwards.
fn with_pool(
    conn: &Connection,
    fx: &Fixture,
    pool: &str,
    body: impl FnOnce(u64) -> Result<(), Failure>,
) -> Result<(), Failure> {
    guarded(conn, fx, Made::pools(&[pool]), || {
        let st = conn.storage();
        define_pool(conn, fx, pool)?;
        st.build_pool(pool).step("build")?;
        st.start_pool(pool).step("start")?;
        let unit = volume_unit(conn, pool)?;
        body(unit)
    })
}

/// create → listed, with its capacity, found by name, key and path; pool
/// allocation goes up; duplicate → AlreadyExists; delete → NotFound and
/// pool allocation goes down.
pub fn case_volume_create_delete(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let pool = "conf-pool-vol-create";
    let name = "conf-vol-create";
    with_pool(conn, fx, pool, |unit| {
        let st = conn.storage();
        let label = vol_label(name);
        let before = pool_sizes(conn, pool)?;
        let r = st
            .create_volume(&new_volume(pool, name, unit, Some(unit)))
            .step("create_volume")?;
        ensure!(
            r.pool == pool && r.name == name,
            "create_volume returned {r:?}"
        );
        let vols = st.list_volumes(pool).step("list_volumes")?;
        ensure!(
            vols.contains(&r),
            "the new volume {r:?} is not listed: {vols:?}"
        );
        counts_agree(
            "volumes",
            || Ok(st.list_volumes(pool).step("list_volumes")?.len()),
            || st.count_volumes(pool).step("count_volumes"),
        )?;
        let info = st.volume_info(pool, name).step("volume_info")?;
        ensure!(
            info.capacity == unit,
            "volume_info capacity {}, expected {unit}",
            info.capacity
        );
        ensure!(
            info.format == VolFormat::Raw,
            "volume_info format {}, expected raw",
            info.format
        );
        ensure!(
            info.name == name && info.pool == pool && info.path == r.path && info.key == r.key,
            "volume_info {info:?} does not match {r:?}"
        );
        let after_create = pool_sizes(conn, pool)?;
        ensure!(
            after_create.allocation > before.allocation,
            "pool allocation did not go up on create: {} then {}",
            before.allocation,
            after_create.allocation
        );
        let mut dup = new_volume(pool, name, unit, Some(unit));
        dup.spec.capacity = format_bytes(2 * unit);
        refused(
            "create of an existing volume name",
            st.create_volume(&dup),
            Expected::AlreadyExists,
            &label,
        )?;
        let same = st.volume_info(pool, name).step("volume_info")?;
        ensure!(
            same.capacity == unit,
            "a refused create changed the volume: {same:?}"
        );

        let by_name = st.lookup_volume(pool, name).step("lookup by name")?;
        ensure!(
            by_name == r,
            "lookup by name gave {by_name:?}, create gave {r:?}"
        );
        let by_key = st.lookup_volume_by_key(&r.key).step("lookup by key")?;
        ensure!(
            by_key == r,
            "lookup by key gave {by_key:?}, create gave {r:?}"
        );
        let by_path = st.lookup_volume_by_path(&r.path).step("lookup by path")?;
        ensure!(
            by_path == r,
            "lookup by path gave {by_path:?}, create gave {r:?}"
        );

        st.delete_volume(pool, name).step("delete_volume")?;
        refused(
            "lookup after delete",
            st.lookup_volume(pool, name),
            Expected::NotFound,
            &label,
        )?;
        refused(
            "volume_info after delete",
            st.volume_info(pool, name),
            Expected::NotFound,
            &label,
        )?;
        refused(
            "delete again",
            st.delete_volume(pool, name),
            Expected::NotFound,
            &label,
        )?;
        refused(
            "lookup by key after delete",
            st.lookup_volume_by_key(&r.key),
            Expected::NotFound,
            &r.key,
        )?;
        refused(
            "lookup by path after delete",
            st.lookup_volume_by_path(&r.path),
            Expected::NotFound,
            &r.path,
        )?;
        let vols = st.list_volumes(pool).step("list_volumes")?;
        ensure!(
            !vols.contains(&r),
            "a deleted volume is still listed: {vols:?}"
        );
        let after_delete = pool_sizes(conn, pool)?;
        ensure!(
            after_delete.allocation < after_create.allocation,
            "pool allocation did not go down on delete: {} then {}",
            after_create.allocation,
            after_delete.allocation
        );
        Ok(())
    })
}

/// Lookups of unknown volumes → NotFound naming them; a volume in an
/// unknown pool → NotFound naming the pool.
pub fn case_volume_lookup_unknown(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let pool = "conf-pool-vol-lookup";
    let missing = "conf-vol-missing";
    with_pool(conn, fx, pool, |unit| {
        let st = conn.storage();
        let label = vol_label(missing);
        refused(
            "lookup_volume",
            st.lookup_volume(pool, missing),
            Expected::NotFound,
            &label,
        )?;
        refused(
            "volume_info",
            st.volume_info(pool, missing),
            Expected::NotFound,
            &label,
        )?;
        refused(
            "wipe_volume",
            st.wipe_volume(pool, missing),
            Expected::NotFound,
            &label,
        )?;
        refused(
            "delete_volume",
            st.delete_volume(pool, missing),
            Expected::NotFound,
            &label,
        )?;
        refused(
            "resize_volume",
            st.resize_volume(pool, missing, unit, ResizeFlags::default()),
            Expected::NotFound,
            &label,
        )?;
        let path = "/nonexistent/conf-vol-missing";
        refused(
            "lookup_volume_by_path",
            st.lookup_volume_by_path(path),
            Expected::NotFound,
            path,
        )?;
        refused(
            "lookup_volume_by_key",
            st.lookup_volume_by_key(path),
            Expected::NotFound,
            path,
        )?;
        let no_pool = "conf-pool-nonexistent";
        refused(
            "create_volume in an unknown pool",
            st.create_volume(&new_volume(no_pool, missing, unit, None)),
            Expected::NotFound,
            &pool_label(no_pool),
        )?;
        refused(
            "lookup_volume in an unknown pool",
            st.lookup_volume(no_pool, missing),
            Expected::NotFound,
            &pool_label(no_pool),
        )?;
        Ok(())
    })
}

/// clone → a new volume with the same capacity; clone of an unknown volume
/// → NotFound; clone into an existing name → AlreadyExists.
pub fn case_volume_clone(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let pool = "conf-pool-vol-clone";
    let source = "conf-vol-clone-src";
    let copy = "conf-vol-clone-dst";
    with_pool(conn, fx, pool, |unit| {
        let st = conn.storage();
        st.create_volume(&new_volume(pool, source, unit, Some(unit)))
            .step("create source")?;
        let before = pool_sizes(conn, pool)?;
        let clone_of = |name: &str, from: &str| {
            let mut v = new_volume(pool, name, unit, None);
            v.spec.source = Some(VolumeSource {
                clone: Some(CloneSource {
                    volume: from.to_string(),
                    overlay: false,
                }),
                ..VolumeSource::default()
            });
            v
        };
        let r = st.create_volume(&clone_of(copy, source)).step("clone")?;
        ensure!(r.name == copy && r.pool == pool, "clone returned {r:?}");
        let info = st
            .volume_info(pool, copy)
            .step("volume_info of the clone")?;
        let src = st
            .volume_info(pool, source)
            .step("volume_info of the source")?;
        ensure!(
            info.capacity == src.capacity,
            "the clone has capacity {}, the source {}",
            info.capacity,
            src.capacity
        );
        ensure!(
            r.path != src.path && r.key != src.key,
            "the clone shares the source's path or key: {r:?} vs {src:?}"
        );
        let names: Vec<String> = st
            .list_volumes(pool)
            .step("list_volumes")?
            .into_iter()
            .map(|v| v.name)
            .collect();
        expect_listed("volumes", &names, source, true)?;
        expect_listed("volumes", &names, copy, true)?;
        let after = pool_sizes(conn, pool)?;
        ensure!(
            after.allocation > before.allocation,
            "pool allocation did not go up on a full clone: {} then {}",
            before.allocation,
            after.allocation
        );
        refused(
            "clone into an existing name",
            st.create_volume(&clone_of(copy, source)),
            Expected::AlreadyExists,
            &vol_label(copy),
        )?;
        let missing = "conf-vol-clone-none";
        refused(
            "clone of an unknown volume",
            st.create_volume(&clone_of("conf-vol-clone-x", missing)),
            Expected::NotFound,
            &vol_label(missing),
        )?;
        refused(
            "lookup of a refused clone",
            st.lookup_volume(pool, "conf-vol-clone-x"),
            Expected::NotFound,
            &vol_label("conf-vol-clone-x"),
        )?;
        Ok(())
    })
}

/// resize: grow ok (absolute and delta); shrink without the flag →
/// InvalidArgument; shrink with it ok; past the pool's free space → NoSpace.
pub fn case_volume_resize(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let pool = "conf-pool-vol-resize";
    let name = "conf-vol-resize";
    with_pool(conn, fx, pool, |unit| {
        let st = conn.storage();
        let label = vol_label(name);
        // Sparse, so that shrinking is not limited by the allocation.
        st.create_volume(&new_volume(pool, name, unit, Some(0)))
            .step("create")?;
        let capacity = || -> Result<u64, Failure> {
            Ok(st.volume_info(pool, name).step("volume_info")?.capacity)
        };
        st.resize_volume(pool, name, 2 * unit, ResizeFlags::default())
            .step("grow")?;
        ensure!(
            capacity()? == 2 * unit,
            "after growing, capacity {} (expected {})",
            capacity()?,
            2 * unit
        );
        let delta = ResizeFlags {
            delta: true,
            ..ResizeFlags::default()
        };
        st.resize_volume(pool, name, unit, delta)
            .step("grow by a delta")?;
        ensure!(
            capacity()? == 3 * unit,
            "after growing by a delta, capacity {} (expected {})",
            capacity()?,
            3 * unit
        );
        refused(
            "shrink without the shrink flag",
            st.resize_volume(pool, name, unit, ResizeFlags::default()),
            Expected::InvalidArgument,
            &label,
        )?;
        ensure!(
            capacity()? == 3 * unit,
            "a refused shrink changed the capacity to {}",
            capacity()?
        );
        let shrink = ResizeFlags {
            shrink: true,
            ..ResizeFlags::default()
        };
        st.resize_volume(pool, name, unit, shrink)
            .step("shrink with the shrink flag")?;
        ensure!(
            capacity()? == unit,
            "after shrinking, capacity {} (expected {unit})",
            capacity()?
        );

        let free = pool_sizes(conn, pool)?.available;
        let too_big = unit + free + unit;
        let allocate = ResizeFlags {
            allocate: true,
            ..ResizeFlags::default()
        };
        refused(
            "resize past the pool's free space",
            st.resize_volume(pool, name, too_big, allocate),
            Expected::NoSpace,
            &label,
        )?;
        ensure!(
            capacity()? == unit,
            "a refused resize changed the capacity to {}",
            capacity()?
        );
        Ok(())
    })
}

/// create past the pool's free space → NoSpace naming the volume; nothing is
/// created and the pool's allocation is unchanged.
pub fn case_volume_no_space(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let pool = "conf-pool-vol-nospace";
    let name = "conf-vol-nospace";
    with_pool(conn, fx, pool, |unit| {
        let st = conn.storage();
        let label = vol_label(name);
        let before = pool_sizes(conn, pool)?;
        let too_big = before.available + unit;
        refused(
            "create past the pool's free space",
            st.create_volume(&new_volume(pool, name, too_big, Some(too_big))),
            Expected::NoSpace,
            &label,
        )?;
        refused(
            "lookup of the refused volume",
            st.lookup_volume(pool, name),
            Expected::NotFound,
            &label,
        )?;
        let after = pool_sizes(conn, pool)?;
        ensure!(
            after.allocation <= before.allocation,
            "a refused create raised the pool's allocation from {} to {}",
            before.allocation,
            after.allocation
        );
        // A volume that fits is still accepted.
        st.create_volume(&new_volume(pool, name, unit, Some(unit)))
            .step("create that fits")?;
        Ok(())
    })
}

/// wipe of a volume is accepted and keeps its size; wipe of an unknown one → NotFound.
pub fn case_volume_wipe(conn: &Connection, fx: &Fixture) -> Result<(), Failure> {
    let pool = "conf-pool-vol-wipe";
    let name = "conf-vol-wipe";
    with_pool(conn, fx, pool, |unit| {
        let st = conn.storage();
        st.create_volume(&new_volume(pool, name, unit, Some(unit)))
            .step("create")?;
        st.wipe_volume(pool, name).step("wipe")?;
        let info = st.volume_info(pool, name).step("volume_info")?;
        ensure!(info.capacity == unit, "wipe changed the capacity: {info:?}");
        let missing = "conf-vol-wipe-none";
        refused(
            "wipe of an unknown volume",
            st.wipe_volume(pool, missing),
            Expected::NotFound,
            &vol_label(missing),
        )?;
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// The list
// ---------------------------------------------------------------------------

/// A conformance case.
pub type CaseFn = fn(&Connection, &Fixture) -> Result<(), Failure>;

/// Every case, by name. [`conformance_tests!`](crate::conformance_tests)
/// makes one test per entry and checks that it covers all of them.
pub const CASES: &[(&str, CaseFn)] = &[
    ("case_domain_define", case_domain_define),
    ("case_domain_start", case_domain_start),
    ("case_domain_suspend_resume", case_domain_suspend_resume),
    ("case_domain_shutdown", case_domain_shutdown),
    (
        "case_domain_inactive_operations",
        case_domain_inactive_operations,
    ),
    ("case_domain_reboot_reset", case_domain_reboot_reset),
    (
        "case_domain_paused_transitions",
        case_domain_paused_transitions,
    ),
    ("case_domain_save_restore", case_domain_save_restore),
    ("case_domain_snapshots", case_domain_snapshots),
    ("case_domain_destroy", case_domain_destroy),
    ("case_domain_destroy_paused", case_domain_destroy_paused),
    ("case_domain_undefine_active", case_domain_undefine_active),
    (
        "case_domain_undefine_inactive",
        case_domain_undefine_inactive,
    ),
    ("case_domain_create_transient", case_domain_create_transient),
    (
        "case_domain_create_active_name",
        case_domain_create_active_name,
    ),
    (
        "case_domain_create_over_defined",
        case_domain_create_over_defined,
    ),
    ("case_domain_define_transient", case_domain_define_transient),
    ("case_domain_duplicate_uuid", case_domain_duplicate_uuid),
    ("case_domain_redefine_running", case_domain_redefine_running),
    ("case_domain_list_filters", case_domain_list_filters),
    ("case_domain_lookup_unknown", case_domain_lookup_unknown),
    ("case_domain_memory", case_domain_memory),
    ("case_domain_vcpus", case_domain_vcpus),
    (
        "case_domain_live_change_inactive",
        case_domain_live_change_inactive,
    ),
    ("case_domain_autostart", case_domain_autostart),
    ("case_domain_invalid_spec", case_domain_invalid_spec),
    (
        "case_domain_on_reboot_destroy",
        case_domain_on_reboot_destroy,
    ),
    (
        "case_domain_on_poweroff_restart",
        case_domain_on_poweroff_restart,
    ),
    ("case_network_lifecycle", case_network_lifecycle),
    ("case_network_undefine_active", case_network_undefine_active),
    ("case_network_transient", case_network_transient),
    (
        "case_network_create_over_defined",
        case_network_create_over_defined,
    ),
    (
        "case_network_define_transient",
        case_network_define_transient,
    ),
    ("case_network_redefine_active", case_network_redefine_active),
    ("case_network_autostart", case_network_autostart),
    ("case_network_lookup", case_network_lookup),
    ("case_network_duplicate_uuid", case_network_duplicate_uuid),
    ("case_network_list_filters", case_network_list_filters),
    ("case_pool_lifecycle", case_pool_lifecycle),
    ("case_pool_transient", case_pool_transient),
    ("case_pool_define_transient", case_pool_define_transient),
    ("case_pool_lookup", case_pool_lookup),
    ("case_pool_duplicate_uuid", case_pool_duplicate_uuid),
    ("case_pool_list_filters", case_pool_list_filters),
    ("case_pool_autostart", case_pool_autostart),
    ("case_pool_redefine_active", case_pool_redefine_active),
    (
        "case_pool_inactive_volume_ops",
        case_pool_inactive_volume_ops,
    ),
    ("case_volume_create_delete", case_volume_create_delete),
    ("case_volume_lookup_unknown", case_volume_lookup_unknown),
    ("case_volume_clone", case_volume_clone),
    ("case_volume_resize", case_volume_resize),
    ("case_volume_no_space", case_volume_no_space),
    ("case_volume_wipe", case_volume_wipe),
];

/// Runs every case in order, each on a fresh connection from the factory.
pub fn run_all(
    conn_factory: impl Fn() -> Connection,
    fx: &Fixture,
) -> Vec<(&'static str, Result<(), Failure>)> {
    CASES
        .iter()
        .map(|(name, case)| {
            let conn = conn_factory();
            (*name, case(&conn, fx))
        })
        .collect()
}

/// Expands to one `#[test]` per conformance case, each on a fresh connection
/// from `$factory` (an expression callable with no argument that returns a
/// [`Connection`]) with the fixture `$fixture` (an expression of type
/// [`Fixture`]), plus a test that the list covers [`CASES`].
#[macro_export]
macro_rules! conformance_tests {
    ($factory:expr, $fixture:expr $(,)?) => {
        $crate::conformance_tests!(@cases ($factory) ($fixture)
            case_domain_define
            case_domain_start
            case_domain_suspend_resume
            case_domain_shutdown
            case_domain_inactive_operations
            case_domain_reboot_reset
            case_domain_paused_transitions
            case_domain_save_restore
            case_domain_snapshots
            case_domain_destroy
            case_domain_destroy_paused
            case_domain_undefine_active
            case_domain_undefine_inactive
            case_domain_create_transient
            case_domain_create_active_name
            case_domain_create_over_defined
            case_domain_define_transient
            case_domain_duplicate_uuid
            case_domain_redefine_running
            case_domain_list_filters
            case_domain_lookup_unknown
            case_domain_memory
            case_domain_vcpus
            case_domain_live_change_inactive
            case_domain_autostart
            case_domain_invalid_spec
            case_domain_on_reboot_destroy
            case_domain_on_poweroff_restart
            case_network_lifecycle
            case_network_undefine_active
            case_network_transient
            case_network_create_over_defined
            case_network_define_transient
            case_network_redefine_active
            case_network_autostart
            case_network_lookup
            case_network_duplicate_uuid
            case_network_list_filters
            case_pool_lifecycle
            case_pool_transient
            case_pool_define_transient
            case_pool_lookup
            case_pool_duplicate_uuid
            case_pool_list_filters
            case_pool_autostart
            case_pool_redefine_active
            case_pool_inactive_volume_ops
            case_volume_create_delete
            case_volume_lookup_unknown
            case_volume_clone
            case_volume_resize
            case_volume_no_space
            case_volume_wipe
        );
    };
    (@cases ($factory:expr) ($fixture:expr) $($case:ident)*) => {
        $(
            #[test]
            fn $case() {
                let conn: $crate::Connection = ($factory)();
                let fixture: $crate::conformance::Fixture = $fixture;
                if let Err(failure) = $crate::conformance::$case(&conn, &fixture) {
                    panic!("{}: {}", stringify!($case), failure);
                }
            }
        )*

        #[test]
        fn conformance_tests_cover_every_case() {
            let generated: &[&str] = &[$(stringify!($case)),*];
            let listed: Vec<&str> = $crate::conformance::CASES.iter().map(|(n, _)| *n).collect();
            assert_eq!(listed, generated, "conformance_tests! and CASES list different cases");
        }
    };
}
