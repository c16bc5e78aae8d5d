//! Links between hosts: the checkpoint link (between the colo-vmm of the primary and of the
//! secondary) and the frame links (between the backends of each NIC).
//!
//! - [`key`]: the link key file (`--link-key`), from which the pre-shared key is derived;
//! - [`secure`]: the handshake (the Noise protocol keyed with it, or a plain hello without a
//!   key) and the record layer, as a [`LinkReader`] and a [`LinkWriter`];
//! - [`listener`]: accepting links so that silent, garbage and unauthenticated connections
//!   never keep the real peer out;
//! - [`message`] and [`frame_link`]: the frame link's messages, its lease and its credits.
//!
//! Every connection between hosts goes through [`secure`]: with a key it is mutually
//! authenticated and encrypted; without one it is plain, and the programs warn at start.

pub mod frame_link;
pub mod key;
pub mod listener;
pub mod message;
pub mod secure;
pub mod socket;

pub use frame_link::{FrameLink, FrameLinkConfig, FrameLinkState, FrameLinkWatch, PeerEvent};
pub use key::{KeyError, LinkKey};
pub use listener::{accept_one, AuthPolicy, LinkAcceptor, LinkListener, AUTH_TIMEOUT};
pub use message::PeerMessage;
pub use secure::{
    accept, connect, is_tampered, paired, write_all_vectored, LinkConn, LinkError, LinkReader, LinkWriter,
};
pub use socket::LinkSocket;
