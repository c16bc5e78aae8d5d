//! The VM as its orchestrators see it: snapshot, migration and the COLO roles drive a VM only
//! through these traits (cloud-hypervisor's Pausable / Snapshottable / Migratable are the
//! model), never the other way round. The VMM implements them on its running VM; unit tests
//! implement them on a fake to check the orchestrators' order of operations without KVM.

use crate::devices::block::disk::{Disk, DiskError};
use crate::persist::snapshot::Meta;
use crate::persist::state::MachineState;
use crate::persist::stream::PAGE_SIZE;
use crate::vstate::dirty::DirtyBitmap;

/// Why an operation on the VM failed.
#[derive(Debug, thiserror::Error)]
pub enum MigratableError {
    /// A vCPU thread has ended (the guest exited, crashed or was told to quit).
    #[error("the guest is no longer running")]
    NotRunning,
    /// A state for another number of vCPUs.
    #[error("the state has {saved} vCPUs; this VM has {here}")]
    VcpuCount {
        /// vCPUs in the state.
        saved: usize,
        /// vCPUs here.
        here: usize,
    },
    /// The operation needs a paused VM.
    #[error("the VM is not paused")]
    NotPaused,
    /// A device could not be stopped, restarted or restored.
    #[error("device: {0}")]
    Device(#[from] crate::devices::DeviceError),
    /// Saving or restoring vCPU or VM state failed.
    #[error(transparent)]
    State(#[from] crate::persist::vcpu_state::VcpuStateError),
    /// The saved state is unusable.
    #[error(transparent)]
    Stream(#[from] crate::persist::stream::StreamError),
    /// Dirty tracking failed.
    #[error(transparent)]
    Dirty(#[from] crate::vstate::dirty::DirtyError),
    /// The disk failed.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// Dirty tracking was asked for while it was off.
    #[error("dirty tracking is not on")]
    NotTracking,
    /// A guest page could not be read or written.
    #[error("guest page {page}: {source}")]
    Page {
        /// The page number.
        page: usize,
        /// What vm-memory said.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Stopping and restarting the guest.
pub trait Pausable {
    /// Stops every vCPU and every device's data path: until [`Pausable::resume`], nothing
    /// writes guest memory (the vhost-user backends included). Pausing a paused VM does
    /// nothing. If it fails, the VM runs as before.
    fn pause(&self) -> Result<(), MigratableError>;

    /// Restarts the devices where the pause stopped them, then the vCPUs (unless the user
    /// stopped them, or the VM was handed to a migration destination). Whatever fails, as much
    /// as possible runs again.
    fn resume(&self) -> Result<(), MigratableError>;
}

/// Saving and taking over the machine's state (vCPUs, VM, devices).
pub trait Snapshottable: Pausable {
    /// What kind of machine this is.
    fn describe(&self) -> Meta;

    /// [`Pausable::pause`] for a [`Snapshottable::save_state`] that follows: the vCPU threads
    /// may start reading their state as soon as they stopped, while the devices stop (a
    /// checkpoint waits on the backends meanwhile). By default, just the pause.
    fn pause_to_save(&self) -> Result<(), MigratableError> {
        self.pause()
    }

    /// The state of the paused machine.
    fn save_state(&self) -> Result<MachineState, MigratableError>;

    /// Takes over `state` on the paused machine (each vCPU the state's vCPU of its index): the
    /// devices restart where the state left them; the vCPUs stay paused until
    /// [`Pausable::resume`].
    fn restore_state(&self, state: MachineState) -> Result<(), MigratableError>;
}

/// Everything a migration or a checkpoint needs besides the state: dirty pages, page access
/// and the handover of the backends.
pub trait Migratable: Snapshottable + Send + Sync {
    /// Starts tracking which pages anyone (vCPU, VMM, backends) writes, and which disk blocks
    /// the guest writes.
    fn start_dirty_log(&self) -> Result<(), MigratableError>;

    /// The pages written since the last call (or since tracking started).
    fn dirty_pages(&self) -> Result<DirtyBitmap, MigratableError>;

    /// Stops tracking (nothing happens if it was off).
    fn stop_dirty_log(&self);

    /// Guest RAM in pages of [`PAGE_SIZE`] bytes, from address 0.
    fn page_count(&self) -> usize;

    /// Reads page `page` into `buf` ([`PAGE_SIZE`] bytes).
    fn read_page(&self, page: usize, buf: &mut [u8]) -> Result<(), MigratableError>;

    /// Runs `f` with pages `pages` where they lie in guest memory, without copying them, if
    /// nothing can write guest memory meanwhile: the VM paused (vCPUs and devices stopped, see
    /// [`Migratable::pause_to_save`]), and kept so until `f` returns. `Ok(None)` otherwise
    /// (and by default): the caller copies the pages instead.
    fn with_paused_pages<T>(
        &self,
        _pages: &[usize],
        _f: impl FnOnce(&[&[u8]]) -> T,
    ) -> Result<Option<T>, MigratableError> {
        Ok(None)
    }

    /// Writes `data` ([`PAGE_SIZE`] bytes) into page `page`.
    fn write_page(&self, page: usize, data: &[u8]) -> Result<(), MigratableError>;

    /// Lets go of the backends (a paused VM hands them to its migration destination); the
    /// vCPUs stay paused from now on.
    fn release_backends(&self);

    /// Takes the backends back after [`Migratable::release_backends`] (a failed handover): the
    /// devices run again where the pause stopped them; [`Pausable::resume`] restarts the vCPUs.
    fn reattach_backends(&self) -> Result<(), MigratableError>;

    /// The disk, if the VM has one: its written blocks travel with the dirty pages (tracked
    /// while the dirty log is on), and a COLO secondary holds its own writes in its overlay.
    fn disk(&self) -> Option<&Disk> {
        None
    }

    /// Bytes of guest RAM.
    fn mem_size(&self) -> u64 {
        (self.page_count() * PAGE_SIZE) as u64
    }
}

/// Pauses `vm`, runs `f`, and resumes it whatever `f` returned: the one place that spells out
/// "pause, save, resume". An error of `f` comes first; then one of resuming.
pub fn while_paused<V, T, E>(vm: &V, f: impl FnOnce() -> Result<T, E>) -> Result<T, E>
where
    V: Pausable + ?Sized,
    E: From<MigratableError>,
{
    vm.pause()?;
    let result = f();
    let resumed = vm.resume();
    let value = result?;
    resumed?;
    Ok(value)
}

/// A 64-bit hash of every page, in address order (the verify mode of migrations and
/// checkpoints).
pub fn page_digests<V: Migratable + ?Sized>(vm: &V) -> Result<Vec<u64>, MigratableError> {
    crate::persist::snapshot::digests(vm.page_count(), |p, buf| vm.read_page(p, buf))
}

/// The addresses of the pages of `vm` whose digests differ from `theirs` (from
/// [`page_digests`] on the other side).
pub fn differing_pages<V: Migratable + ?Sized>(vm: &V, theirs: &[u64]) -> Result<Vec<u64>, MigratableError> {
    Ok(crate::persist::snapshot::compare_digests(&page_digests(vm)?, theirs)?)
}

/// A 64-bit hash of every disk block, in order, if `vm` has a disk (the verify mode).
pub fn block_digests<V: Migratable + ?Sized>(vm: &V) -> Result<Option<Vec<u64>>, MigratableError> {
    Ok(vm.disk().map(Disk::digests).transpose()?)
}

/// The numbers of the disk blocks of `vm` whose digests differ from `theirs` (from
/// [`block_digests`] on the other side); a VM without a disk differs from any digests.
pub fn differing_blocks<V: Migratable + ?Sized>(vm: &V, theirs: &[u64]) -> Result<Vec<u64>, MigratableError> {
    let ours = block_digests(vm)?.unwrap_or_default();
    let diff = crate::persist::snapshot::compare_digests(&ours, theirs)?;
    Ok(diff.into_iter().map(|a| a / PAGE_SIZE as u64).collect())
}
