//! Reading and writing whole vhost-user messages, with their file descriptors, on a blocking
//! Unix stream socket (vmm-sys-util's [`ScmSocket`] does the `sendmsg`/`recvmsg`).
//!
//! Bounds: a payload is at most [`MAX_MSG_SIZE`] bytes and a message carries at most
//! [`MAX_ATTACHED_FD_ENTRIES`] descriptors; anything beyond is an error, and every descriptor
//! received is owned (closed on every path) before anything else is decided.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use vhost::vhost_user::message::{MAX_ATTACHED_FD_ENTRIES, MAX_MSG_SIZE};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::message::{payload_size, Message, HEADER_LEN};

/// Why a message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The socket failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The peer closed the connection in the middle of a message.
    #[error("connection closed in the middle of a message ({got} of {want} bytes)")]
    Truncated {
        /// Bytes received.
        got: usize,
        /// Bytes the message needed.
        want: usize,
    },
    /// The header announces more payload than any vhost-user message has.
    #[error("message announces {0} payload bytes, more than the protocol's {MAX_MSG_SIZE}")]
    TooLarge(u32),
    /// More descriptors than the protocol allows in one message (or the kernel truncated them).
    #[error("more than {MAX_ATTACHED_FD_ENTRIES} file descriptors attached to one message")]
    TooManyFds,
}

/// Reads one whole message from `sock` (blocking). `Ok(None)`: the peer closed the connection
/// between messages.
pub fn recv_message(sock: &UnixStream) -> Result<Option<Message>, WireError> {
    let mut fds = Vec::new();
    let mut header = [0u8; HEADER_LEN];
    let got = recv_exact(sock, &mut header, &mut fds)?;
    if got == 0 {
        return Ok(None);
    }
    if got < HEADER_LEN {
        return Err(WireError::Truncated { got, want: HEADER_LEN });
    }
    let size = payload_size(&header).expect("a whole header");
    if size as usize > MAX_MSG_SIZE {
        return Err(WireError::TooLarge(size));
    }
    let mut bytes = vec![0u8; HEADER_LEN + size as usize];
    bytes[..HEADER_LEN].copy_from_slice(&header);
    let got = recv_exact(sock, &mut bytes[HEADER_LEN..], &mut fds)?;
    if got < size as usize {
        return Err(WireError::Truncated { got: HEADER_LEN + got, want: bytes.len() });
    }
    if fds.len() > MAX_ATTACHED_FD_ENTRIES {
        return Err(WireError::TooManyFds);
    }
    Ok(Some(Message::from_wire(bytes, fds)))
}

/// Fills `buf` unless the peer closes first; returns the bytes read. Descriptors received on
/// the way are appended to `fds` (the kernel delivers them with the first bytes of the
/// `sendmsg` that carried them, normally the header).
fn recv_exact(sock: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> Result<usize, WireError> {
    let mut got = 0;
    while got < buf.len() {
        match recv_some(sock, &mut buf[got..], fds) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(WireError::Io(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// One `recvmsg(2)` into `buf`, taking ownership of every descriptor received.
///
/// Room is given for [`MAX_ATTACHED_FD_ENTRIES`]; if more came with this piece, vmm-sys-util
/// closes them all and reports `ENOBUFS` (the kernel's `MSG_CTRUNC`), which is
/// [`WireError::TooManyFds`]. (It receives without `MSG_CMSG_CLOEXEC`; this process never
/// executes another program, so no descriptor can leak into one.)
fn recv_some(sock: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> Result<usize, WireError> {
    let mut raw: [RawFd; MAX_ATTACHED_FD_ENTRIES] = [-1; MAX_ATTACHED_FD_ENTRIES];
    let mut iov = [libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() }];
    // SAFETY: the one iovec covers `buf`, which is borrowed mutably for the whole call, and any
    // bytes may be written to it.
    match unsafe { sock.recv_with_fds(&mut iov, &mut raw) } {
        Ok((n, count)) => {
            // SAFETY: recv_with_fds hands over the first `count` entries, fresh descriptors
            // that nothing else owns.
            fds.extend(raw[..count].iter().map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            Ok(n)
        }
        Err(e) if e.errno() == libc::ENOBUFS => Err(WireError::TooManyFds),
        Err(e) => Err(WireError::Io(e.into())),
    }
}

/// Writes `m` to `sock` (blocking): descriptors go with the first `sendmsg(2)`, so they arrive
/// with the header as vhost-user requires. A closed peer is an error (`MSG_NOSIGNAL`), not
/// `SIGPIPE`.
pub fn send_message(sock: &UnixStream, m: &Message) -> io::Result<()> {
    if m.fds().len() > MAX_ATTACHED_FD_ENTRIES {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "too many file descriptors for one message"));
    }
    let raw: Vec<RawFd> = m.fds().iter().map(AsRawFd::as_raw_fd).collect();
    let mut sent = 0;
    let mut with = raw.as_slice();
    while sent < m.bytes().len() {
        match sock.send_with_fds(&[&m.bytes()[sent..]], with) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                sent += n;
                with = &[];
            }
            Err(e) if e.errno() == libc::EINTR => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use vhost::vhost_user::message::FrontendReq;

    use super::super::testutil::{new_fd, req};
    use super::*;

    #[test]
    fn descriptors_arrive_with_the_message() {
        let (a, b) = UnixStream::pair().unwrap();
        let fds: Vec<OwnedFd> = (0..3).map(|_| new_fd()).collect();
        let m = req(FrontendReq::SET_MEM_TABLE, 0, &[0x5a; 8 + 3 * 32]).with_fds(fds);
        send_message(&a, &m).unwrap();
        let got = recv_message(&b).unwrap().unwrap();
        assert_eq!((got.bytes(), got.fds().len()), (m.bytes(), 3));
        drop(a);
        assert!(recv_message(&b).unwrap().is_none(), "EOF between messages");
    }

    #[test]
    fn too_many_descriptors_are_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let fds: Vec<OwnedFd> = (0..MAX_ATTACHED_FD_ENTRIES + 1).map(|_| new_fd()).collect();
        let m = req(FrontendReq::SET_MEM_TABLE, 0, &[0; 8]);
        assert!(send_message(&a, &Message::new(m.request(), m.flags(), m.payload()).with_fds(fds)).is_err());
        let raw: Vec<OwnedFd> = (0..MAX_ATTACHED_FD_ENTRIES + 1).map(|_| new_fd()).collect();
        let raw: Vec<RawFd> = raw.iter().map(AsRawFd::as_raw_fd).collect();
        let (first, second) = raw.split_at(MAX_ATTACHED_FD_ENTRIES);
        // Sent by hand: two sendmsg calls each within the limit, one message over it in total.
        a.send_with_fds(&[&m.bytes()[..HEADER_LEN]], first).unwrap();
        a.send_with_fds(&[&m.bytes()[HEADER_LEN..]], second).unwrap();
        assert!(matches!(recv_message(&b), Err(WireError::TooManyFds)));
        // One sendmsg with more than the protocol allows: truncated by the kernel, refused here.
        let (a, b) = UnixStream::pair().unwrap();
        a.send_with_fds(&[m.bytes()], &raw).unwrap();
        assert!(matches!(recv_message(&b), Err(WireError::TooManyFds)));
    }

    #[test]
    fn an_oversized_or_cut_message_is_an_error() {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&[0xde; 100]).unwrap();
        assert!(matches!(recv_message(&b), Err(WireError::TooLarge(_))));
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&req(FrontendReq::SET_FEATURES, 0, &[1; 8]).bytes()[..15]).unwrap();
        drop(a);
        assert!(matches!(recv_message(&b), Err(WireError::Truncated { got: 15, want: 20 })));
    }
}
