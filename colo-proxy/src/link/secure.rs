//! The link's handshake and record layer: the Noise protocol (`Noise_NNpsk0_25519_AESGCM_SHA256`,
//! from the `snow` crate) keyed with the link key, or a plain hello when no key is given.
//!
//! With a key, a connection is
//! 1. two handshake messages (`-> psk, e` and `<- e, ee`), each a 2-byte big-endian length and
//!    the Noise message: the pre-shared key is mixed in before anything is sent, so each side's
//!    first message only verifies for a peer that holds the same key (mutual authentication),
//!    and fresh ephemeral keys make every connection's traffic keys new;
//! 2. a confirmation from the connecting side, the first transport message, naming the link's
//!    purpose (`checkpoint`, `frames`): the accepting side counts a connection as authenticated
//!    only once this decrypts, so a replayed first handshake message cannot take a listener;
//! 3. the link's bytes in transport messages of at most 65535 bytes (2-byte length, ciphertext,
//!    16-byte tag), nonces counting up per direction: a changed, dropped, replayed or reordered
//!    message fails its tag and the reader reports the link [`tampered`](is_tampered).
//!
//! Without a key, the connecting side sends one line, `COLO-LINK/1 PLAIN <purpose>`, and then
//! the link's bytes as they are. Each side recognises the other kind of hello and says which
//! side lacks the key, rather than failing on garbage.

use std::io::{self, BufReader, IoSlice, Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use snow::{Builder, StatelessTransportState};

use super::key::LinkKey;
use super::socket::LinkSocket;

/// The Noise protocol of every keyed link.
pub const NOISE_PARAMS: &str = "Noise_NNpsk0_25519_AESGCM_SHA256";
/// Bound into the handshake: a peer speaking another protocol (or version) fails it.
const PROLOGUE: &[u8] = b"colo-link/1";
/// Longest Noise message.
const MAX_MESSAGE: usize = 65535;
/// AEAD tag length.
const TAG: usize = 16;
/// Most link bytes one transport message carries.
pub const MAX_PLAIN: usize = MAX_MESSAGE - TAG;
/// The plain hello's first bytes.
const PLAIN_MAGIC: &[u8] = b"COLO-LINK/1 PLAIN ";
/// The confirmation's first bytes (the purpose follows).
const CONFIRM: &[u8] = b"colo-link/1 confirm ";
/// The first Noise message with an empty payload: an ephemeral key and the payload's tag.
const FIRST_MESSAGE_LEN: usize = 32 + TAG;
/// Longest purpose name.
const MAX_PURPOSE: usize = 32;
/// Sealed bytes gathered before they are written, so many small records cost one system call.
const WRITE_BATCH: usize = 256 * 1024;
/// Most pieces one gathered write passes to the socket (the kernel's limit is 1024).
const MAX_IOVECS: usize = 512;

/// Why a link could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The socket failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The peer did not complete its part in time.
    #[error("the peer did not complete the link handshake within {0:?}")]
    Timeout(Duration),
    /// The peer's handshake does not verify.
    #[error("the peer's handshake does not verify: it holds another link key (or is no colo link)")]
    WrongKey,
    /// The accepting side hung up during the handshake (it refused this side's key).
    #[error(
        "the peer closed the connection during the handshake: it holds another link key, or has none (see its log)"
    )]
    Refused,
    /// A plain hello reached a side with a key.
    #[error("the peer has no --link-key (it sent a plain hello) but this side has one")]
    PeerHasNoKey,
    /// An encrypted handshake reached a side without a key.
    #[error("the peer uses a --link-key (it sent an encrypted handshake) but this side has none")]
    PeerHasKey,
    /// The link is for something else (e.g. a frame link at the checkpoint port).
    #[error("the peer opened a '{got}' link where a '{expected}' link was expected")]
    WrongPurpose {
        /// What this side serves.
        expected: String,
        /// What the peer asked for.
        got: String,
    },
    /// Bytes that are no colo link at all.
    #[error("the peer sent {0} that is no colo link hello")]
    Garbage(String),
}

/// The error inside an [`io::Error`] from a [`LinkReader`] whose record failed authentication.
#[derive(Debug, thiserror::Error)]
#[error("a link record failed authentication: the stream was changed, replayed or cut in transit")]
pub struct Tampered;

/// Whether `e` reports a record that failed authentication (rather than a closed connection).
pub fn is_tampered(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<Tampered>())
}

/// An established link: a reader, a writer, and a handle to end it.
pub struct LinkConn<S: LinkSocket> {
    /// The peer's bytes.
    pub reader: LinkReader<S>,
    /// Bytes to the peer (buffered: call `flush`).
    pub writer: LinkWriter<S>,
    /// Ends the connection (wakes a blocked reader).
    pub control: S,
    /// The peer, for logs.
    pub peer: String,
    /// Whether the link is encrypted.
    pub secure: bool,
}

impl<S: LinkSocket> std::fmt::Debug for LinkConn<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkConn").field("peer", &self.peer).field("secure", &self.secure).finish()
    }
}

/// The connecting side: says hello (or runs the handshake as initiator) within `timeout`.
pub fn connect<S: LinkSocket>(
    sock: S,
    key: Option<&LinkKey>,
    purpose: &str,
    timeout: Duration,
) -> Result<LinkConn<S>, LinkError> {
    assert!(purpose.len() <= MAX_PURPOSE && !purpose.contains('\n'), "purpose names are short words");
    let deadline = Instant::now() + timeout;
    let peer = sock.peer_name();
    let mut wr = sock.try_clone_socket()?;
    let control = sock.try_clone_socket()?;
    let mut rd = BufReader::new(sock);
    let Some(key) = key else {
        wr.set_write_deadline(Some(timeout))?;
        wr.write_all(&plain_hello(purpose))?;
        wr.set_write_deadline(None)?;
        // The accepting side answers with the same hello, or hangs up (it wants a key).
        let mut first = [0u8; 2];
        read_exact_by(&mut rd, &mut first, deadline, timeout).map_err(refused_on_eof)?;
        if first != PLAIN_MAGIC[..2] {
            return Err(LinkError::Garbage(describe(&first)));
        }
        check_purpose(purpose, &read_plain_hello(&mut rd, deadline, timeout)?)?;
        return Ok(finish(rd, wr, control, peer, None));
    };
    let mut hs = builder(key).build_initiator().expect("valid Noise parameters");
    let mut buf = vec![0u8; MAX_MESSAGE];
    let n = hs.write_message(&[], &mut buf).expect("a handshake message fits");
    send_message(&mut wr, &buf[..n], deadline, timeout)?;
    let reply = read_message(&mut rd, deadline, timeout).map_err(refused_on_eof)?;
    let mut payload = vec![0u8; MAX_MESSAGE];
    hs.read_message(&reply, &mut payload).map_err(|_| LinkError::WrongKey)?;
    let state = Arc::new(hs.into_stateless_transport_mode().expect("the handshake is complete"));
    let mut confirm = CONFIRM.to_vec();
    confirm.extend_from_slice(purpose.as_bytes());
    let n = state.write_message(0, &confirm, &mut buf).expect("the confirmation fits");
    send_message(&mut wr, &buf[..n], deadline, timeout)?;
    Ok(finish(rd, wr, control, peer, Some((state, 1))))
}

/// The accepting side: checks the peer's hello (or runs the handshake as responder and waits
/// for the confirmation) within `timeout`.
pub fn accept<S: LinkSocket>(
    sock: S,
    key: Option<&LinkKey>,
    purpose: &str,
    timeout: Duration,
) -> Result<LinkConn<S>, LinkError> {
    let deadline = Instant::now() + timeout;
    let peer = sock.peer_name();
    let mut wr = sock.try_clone_socket()?;
    let control = sock.try_clone_socket()?;
    let mut rd = BufReader::new(sock);
    let mut first = [0u8; 2];
    read_exact_by(&mut rd, &mut first, deadline, timeout)?;
    let said_plain = first == PLAIN_MAGIC[..2];
    let Some(key) = key else {
        if !said_plain {
            return Err(if u16::from_be_bytes(first) as usize == FIRST_MESSAGE_LEN {
                LinkError::PeerHasKey
            } else {
                LinkError::Garbage(describe(&first))
            });
        }
        let got = read_plain_hello(&mut rd, deadline, timeout)?;
        check_purpose(purpose, &got)?;
        send_bytes(&mut wr, &plain_hello(purpose), deadline, timeout)?;
        return Ok(finish(rd, wr, control, peer, None));
    };
    if said_plain {
        // Read on only to tell a plain colo link from garbage.
        return Err(match read_plain_hello(&mut rd, deadline, timeout) {
            Ok(_) => LinkError::PeerHasNoKey,
            Err(e) => e,
        });
    }
    let len = u16::from_be_bytes(first) as usize;
    if len != FIRST_MESSAGE_LEN {
        return Err(LinkError::Garbage(describe(&first)));
    }
    let mut msg = vec![0u8; len];
    read_exact_by(&mut rd, &mut msg, deadline, timeout)?;
    let mut hs = builder(key).build_responder().expect("valid Noise parameters");
    let mut payload = vec![0u8; MAX_MESSAGE];
    hs.read_message(&msg, &mut payload).map_err(|_| LinkError::WrongKey)?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    let n = hs.write_message(&[], &mut buf).expect("a handshake message fits");
    send_message(&mut wr, &buf[..n], deadline, timeout)?;
    let state = Arc::new(hs.into_stateless_transport_mode().expect("the handshake is complete"));
    let confirm = read_message(&mut rd, deadline, timeout)?;
    let n = state.read_message(0, &confirm, &mut payload).map_err(|_| LinkError::WrongKey)?;
    let got = payload[..n]
        .strip_prefix(CONFIRM)
        .ok_or_else(|| LinkError::Garbage("a confirmation of another protocol".into()))?;
    check_purpose(purpose, &String::from_utf8_lossy(got))?;
    Ok(finish(rd, wr, control, peer, Some((state, 1))))
}

/// A plain link over a socket whose two ends were made together (a socket pair in one
/// process, as tests use): no hello, nothing to authenticate.
pub fn paired<S: LinkSocket>(sock: S) -> io::Result<LinkConn<S>> {
    let peer = sock.peer_name();
    let (wr, control) = (sock.try_clone_socket()?, sock.try_clone_socket()?);
    Ok(finish(BufReader::new(sock), wr, control, peer, None))
}

fn plain_hello(purpose: &str) -> Vec<u8> {
    let mut hello = PLAIN_MAGIC.to_vec();
    hello.extend_from_slice(purpose.as_bytes());
    hello.push(b'\n');
    hello
}

/// The peer hanging up in the middle of the handshake means it refused this side.
fn refused_on_eof(e: LinkError) -> LinkError {
    match e {
        LinkError::Io(e) if matches!(e.kind(), io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset) => {
            LinkError::Refused
        }
        e => e,
    }
}

fn builder(key: &LinkKey) -> Builder<'_> {
    Builder::new(NOISE_PARAMS.parse().expect("valid Noise parameters"))
        .psk(0, key.psk())
        .expect("a 32-byte pre-shared key")
        .prologue(PROLOGUE)
        .expect("a prologue")
}

fn check_purpose(expected: &str, got: &str) -> Result<(), LinkError> {
    if got == expected {
        Ok(())
    } else {
        Err(LinkError::WrongPurpose { expected: expected.to_string(), got: got.chars().take(MAX_PURPOSE).collect() })
    }
}

fn describe(bytes: &[u8]) -> String {
    let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("bytes {}", hex.join(" "))
}

/// The rest of a plain hello after its first two bytes: the magic, the purpose, `\n`.
fn read_plain_hello<S: LinkSocket>(
    rd: &mut BufReader<S>,
    deadline: Instant,
    timeout: Duration,
) -> Result<String, LinkError> {
    let mut line = PLAIN_MAGIC[..2].to_vec();
    let mut byte = [0u8; 1];
    while line.len() < PLAIN_MAGIC.len() + MAX_PURPOSE + 1 {
        read_exact_by(rd, &mut byte, deadline, timeout)?;
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
        if line.len() <= PLAIN_MAGIC.len() && line[..] != PLAIN_MAGIC[..line.len()] {
            return Err(LinkError::Garbage(format!("'{}'", String::from_utf8_lossy(&line).escape_debug())));
        }
    }
    let purpose = line.get(PLAIN_MAGIC.len()..).unwrap_or_default();
    if byte[0] != b'\n' || line.len() < PLAIN_MAGIC.len() {
        return Err(LinkError::Garbage("an over-long hello".into()));
    }
    Ok(String::from_utf8_lossy(purpose).into_owned())
}

/// Reads exactly `buf`, giving up at `deadline`.
fn read_exact_by<S: LinkSocket>(
    rd: &mut BufReader<S>,
    buf: &mut [u8],
    deadline: Instant,
    timeout: Duration,
) -> Result<(), LinkError> {
    let mut got = 0;
    while got < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(LinkError::Timeout(timeout));
        }
        rd.get_ref().set_read_deadline(Some(left))?;
        match rd.read(&mut buf[got..]) {
            Ok(0) => return Err(LinkError::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => got += n,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Err(LinkError::Timeout(timeout))
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    rd.get_ref().set_read_deadline(None)?;
    Ok(())
}

fn read_message<S: LinkSocket>(
    rd: &mut BufReader<S>,
    deadline: Instant,
    timeout: Duration,
) -> Result<Vec<u8>, LinkError> {
    let mut len = [0u8; 2];
    read_exact_by(rd, &mut len, deadline, timeout)?;
    let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
    read_exact_by(rd, &mut msg, deadline, timeout)?;
    Ok(msg)
}

fn send_message<S: LinkSocket>(wr: &mut S, msg: &[u8], deadline: Instant, timeout: Duration) -> Result<(), LinkError> {
    let mut framed = (msg.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(msg);
    send_bytes(wr, &framed, deadline, timeout)
}

fn send_bytes<S: LinkSocket>(wr: &mut S, bytes: &[u8], deadline: Instant, timeout: Duration) -> Result<(), LinkError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(LinkError::Timeout(timeout));
    }
    wr.set_write_deadline(Some(left))?;
    wr.write_all(bytes).map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => LinkError::Timeout(timeout),
        _ => LinkError::Io(e),
    })?;
    wr.set_write_deadline(None)?;
    Ok(())
}

fn finish<S: LinkSocket>(
    rd: BufReader<S>,
    wr: S,
    control: S,
    peer: String,
    cipher: Option<(Arc<StatelessTransportState>, u64)>,
) -> LinkConn<S> {
    let secure = cipher.is_some();
    let (reader_cipher, writer_cipher) = match cipher {
        Some((state, next)) => {
            // Each side's confirmation used nonce 0 of the initiator's direction: the
            // initiator's writer and the responder's reader continue at 1.
            let initiator = state.is_initiator();
            let (w, r) = if initiator { (next, 0) } else { (0, next) };
            (Some(Opener { state: state.clone(), nonce: r }), Some(Sealer { state, nonce: w }))
        }
        None => (None, None),
    };
    LinkConn {
        reader: LinkReader {
            inner: rd,
            opener: reader_cipher,
            plain: Vec::new(),
            pos: 0,
            sealed: vec![0u8; MAX_MESSAGE],
        },
        writer: LinkWriter { inner: wr, sealer: writer_cipher, pending: Vec::new(), out: Vec::new() },
        control,
        peer,
        secure,
    }
}

struct Opener {
    state: Arc<StatelessTransportState>,
    nonce: u64,
}

struct Sealer {
    state: Arc<StatelessTransportState>,
    nonce: u64,
}

/// The reading half of a link: the peer's bytes, authenticated and decrypted.
pub struct LinkReader<S: LinkSocket> {
    inner: BufReader<S>,
    opener: Option<Opener>,
    /// Decrypted bytes of the current record, and how far they were read.
    plain: Vec<u8>,
    pos: usize,
    sealed: Vec<u8>,
}

impl<S: LinkSocket> LinkReader<S> {
    /// Reads the next sealed transport message into `sealed`; its length, or `None` when the
    /// peer closed the link cleanly between messages.
    fn next_sealed(&mut self) -> io::Result<Option<usize>> {
        let mut len = [0u8; 2];
        match self.inner.read(&mut len[..1])? {
            0 => return Ok(None),
            _ => self.inner.read_exact(&mut len[1..])?,
        }
        let len = u16::from_be_bytes(len) as usize;
        if len < TAG {
            return Err(io::Error::new(io::ErrorKind::InvalidData, Tampered));
        }
        self.inner.read_exact(&mut self.sealed[..len])?;
        Ok(Some(len))
    }

    /// Authenticates and decrypts the message of `len` bytes in `sealed` into `out` (at least
    /// `len - TAG` bytes long); the plain length.
    fn open_into(&mut self, len: usize, out: &mut [u8]) -> io::Result<usize> {
        let Some(opener) = self.opener.as_mut() else { unreachable!("plain links read directly") };
        let n = opener
            .state
            .read_message(opener.nonce, &self.sealed[..len], out)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, Tampered))?;
        opener.nonce += 1;
        Ok(n)
    }
}

impl<S: LinkSocket> Read for LinkReader<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.opener.is_none() {
            return self.inner.read(buf);
        }
        while self.pos == self.plain.len() {
            let Some(len) = self.next_sealed()? else { return Ok(0) };
            if len > TAG && buf.len() >= len - TAG {
                // The caller takes the whole message (a batch of pages): open it in place
                // there instead of into `plain` and copying.
                return self.open_into(len, buf);
            }
            let mut plain = std::mem::take(&mut self.plain);
            plain.resize(len - TAG, 0);
            let opened = self.open_into(len, &mut plain);
            self.plain = plain;
            self.pos = 0;
            // Nothing of a message that does not verify is ever read out.
            self.plain.truncate(opened.as_ref().map_or(0, |n| *n));
            opened?;
        }
        let n = buf.len().min(self.plain.len() - self.pos);
        buf[..n].copy_from_slice(&self.plain[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Writes all of `bufs` (empty ones skipped), in as few system calls as `w` takes
/// (`Write::write_all_vectored` is not stable yet).
pub fn write_all_vectored<W: Write>(w: &mut W, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The writing half of a link: buffered; records are sealed and written on `flush` (and
/// whenever a batch has gathered).
pub struct LinkWriter<S: LinkSocket> {
    inner: S,
    sealer: Option<Sealer>,
    /// Link bytes not yet sealed (at most [`MAX_PLAIN`]).
    pending: Vec<u8>,
    /// Bytes ready for the socket.
    out: Vec<u8>,
}

impl<S: LinkSocket> LinkWriter<S> {
    /// Seals `pending` into one transport message at the end of `out`.
    fn seal(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut self.pending);
        self.seal_from(&pending);
        self.pending = pending;
        self.pending.clear();
    }

    /// Seals `plain` (at most [`MAX_PLAIN`] bytes) into one transport message at the end of
    /// `out`, encrypting straight from the caller's bytes.
    fn seal_from(&mut self, plain: &[u8]) {
        let Some(sealer) = self.sealer.as_mut() else { return };
        let at = self.out.len();
        self.out.resize(at + 2 + plain.len() + TAG, 0);
        let n = sealer
            .state
            .write_message(sealer.nonce, plain, &mut self.out[at + 2..])
            .expect("a record of at most MAX_PLAIN bytes fits its message");
        sealer.nonce += 1;
        self.out[at..at + 2].copy_from_slice(&(n as u16).to_be_bytes());
        self.out.truncate(at + 2 + n);
    }

    fn write_out(&mut self) -> io::Result<()> {
        let r = self.inner.write_all(&self.out);
        self.out.clear();
        r
    }

    /// The socket (e.g. for timeouts).
    pub fn socket(&self) -> &S {
        &self.inner
    }

    /// Plain links: writes what was gathered and then `bufs`, in as few system calls as the
    /// socket takes, without copying `bufs` here.
    fn write_behind_out(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        let mut slices = Vec::with_capacity(bufs.len() + 1);
        slices.push(IoSlice::new(&self.out));
        slices.extend(bufs.iter().map(|b| IoSlice::new(b)));
        let written = write_all_vectored(&mut self.inner, &mut slices);
        self.out.clear();
        written
    }
}

impl<S: LinkSocket> Write for LinkWriter<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.sealer.is_none() {
            if self.out.len() + buf.len() < WRITE_BATCH {
                self.out.extend_from_slice(buf);
                return Ok(buf.len());
            }
            // A large write (a batch of pages) goes to the socket from the caller's buffer,
            // in one system call behind what was gathered (a record's head), instead of being
            // copied into `out` first.
            self.write_behind_out(&[IoSlice::new(buf)])?;
            return Ok(buf.len());
        }
        let mut rest = buf;
        while !rest.is_empty() {
            if self.pending.is_empty() && rest.len() >= MAX_PLAIN {
                // Whole messages are sealed from the caller's bytes, not copied to `pending`.
                let (whole, tail) = rest.split_at(MAX_PLAIN);
                self.seal_from(whole);
                rest = tail;
            } else {
                let n = rest.len().min(MAX_PLAIN - self.pending.len());
                self.pending.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
                if self.pending.len() == MAX_PLAIN {
                    self.seal();
                }
            }
        }
        if self.out.len() >= WRITE_BATCH {
            self.write_out()?;
        }
        Ok(buf.len())
    }

    /// A large gather (a batch of pages lying in guest memory) goes to the socket in as few
    /// system calls as it takes, behind what was gathered, without being copied here first.
    /// Sealed links seal piece by piece, as [`Write::write`] does.
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if self.sealer.is_some() || self.out.len() + total < WRITE_BATCH || bufs.len() >= MAX_IOVECS {
            for b in bufs {
                self.write_all(b)?;
            }
            return Ok(total);
        }
        self.write_behind_out(bufs)?;
        Ok(total)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.seal();
        if !self.out.is_empty() {
            self.write_out()?;
        }
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    const T: Duration = Duration::from_secs(2);

    fn key(b: u8) -> LinkKey {
        LinkKey::derive(&[b; 32])
    }

    /// Connects over a socket pair, the accepting side on a thread.
    fn pair(
        ck: Option<LinkKey>,
        ak: Option<LinkKey>,
        cp: &'static str,
        ap: &'static str,
    ) -> (Result<LinkConn<UnixStream>, LinkError>, Result<LinkConn<UnixStream>, LinkError>) {
        let (a, b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || accept(b, ak.as_ref(), ap, T));
        let c = connect(a, ck.as_ref(), cp, T);
        (c, t.join().unwrap())
    }

    fn exchange(mut c: LinkConn<UnixStream>, mut a: LinkConn<UnixStream>) {
        let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7) as u8).collect();
        // More than a socket buffer holds: the writer needs a reader at work.
        let sent = big.clone();
        // Then a gather of 4 KiB pieces, larger than a write batch, behind a small write.
        let pieces: Vec<Vec<u8>> = (0..100u8).map(|i| vec![i; 4096]).collect();
        let gathered: Vec<u8> = pieces.concat();
        let mut w = c.writer;
        let writing = std::thread::spawn(move || {
            w.write_all(b"hello").unwrap();
            w.write_all(&sent).unwrap();
            w.write_all(b"+").unwrap();
            let slices: Vec<IoSlice<'_>> = pieces.iter().map(|p| IoSlice::new(p)).collect();
            assert_eq!(w.write_vectored(&slices).unwrap(), 100 * 4096, "all of it, in order");
            w.flush().unwrap();
            w
        });
        let mut got = vec![0u8; 5 + big.len() + 1 + gathered.len()];
        a.reader.read_exact(&mut got).unwrap();
        c.writer = writing.join().unwrap();
        assert_eq!(&got[..5], b"hello");
        assert!(got[5..5 + big.len()] == big[..]);
        assert_eq!(got[5 + big.len()], b'+');
        assert!(got[6 + big.len()..] == gathered[..]);
        a.writer.write_all(b"back").unwrap();
        a.writer.flush().unwrap();
        let mut back = [0u8; 4];
        c.reader.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"back");
        drop(c);
        assert_eq!(a.reader.read(&mut back).unwrap(), 0, "a clean close between records");
    }

    #[test]
    fn the_same_key_gives_an_encrypted_link_both_ways() {
        let (c, a) = pair(Some(key(1)), Some(key(1)), "frames", "frames");
        let (c, a) = (c.unwrap(), a.unwrap());
        assert!(c.secure && a.secure);
        exchange(c, a);
    }

    #[test]
    fn no_key_on_either_side_gives_a_plain_link() {
        let (c, a) = pair(None, None, "checkpoint", "checkpoint");
        let (c, a) = (c.unwrap(), a.unwrap());
        assert!(!c.secure && !a.secure);
        exchange(c, a);
    }

    #[test]
    fn a_wrong_key_a_missing_key_or_another_purpose_is_refused_with_a_reason() {
        let (c, a) = pair(Some(key(1)), Some(key(2)), "frames", "frames");
        assert!(matches!(a, Err(LinkError::WrongKey)), "{a:?}");
        assert!(matches!(c, Err(LinkError::Refused)), "{c:?}");
        let (c, a) = pair(None, Some(key(2)), "frames", "frames");
        assert!(matches!(a, Err(LinkError::PeerHasNoKey)), "{a:?}");
        assert!(matches!(c, Err(LinkError::Refused)), "the keyless side learns it too: {c:?}");
        let (_, a) = pair(Some(key(2)), None, "frames", "frames");
        assert!(matches!(a, Err(LinkError::PeerHasKey)), "{a:?}");
        let (_, a) = pair(Some(key(2)), Some(key(2)), "frames", "checkpoint");
        assert!(matches!(a, Err(LinkError::WrongPurpose { .. })), "{a:?}");
        let (_, a) = pair(None, None, "frames", "checkpoint");
        assert!(a.unwrap_err().to_string().contains("'frames' link where a 'checkpoint'"));
    }

    #[test]
    fn silence_and_garbage_are_refused_within_the_timeout() {
        let (a, b) = UnixStream::pair().unwrap();
        let started = Instant::now();
        let r = accept(b, Some(&key(1)), "frames", Duration::from_millis(200));
        assert!(matches!(r, Err(LinkError::Timeout(_))), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(1));
        drop(a);
        for k in [None, Some(key(1))] {
            let (mut a, b) = UnixStream::pair().unwrap();
            a.write_all(&[0xde, 0xad, 0xbe, 0xef, 1, 2, 3]).unwrap();
            let r = accept(b, k.as_ref(), "frames", Duration::from_millis(200));
            assert!(matches!(r, Err(LinkError::Garbage(_))), "{r:?}");
        }
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(b"COLD-LINK\n").unwrap();
        assert!(matches!(accept(b, None, "frames", T), Err(LinkError::Garbage(_))));
    }

    #[test]
    fn a_flipped_byte_in_a_record_is_reported_as_tampering_not_as_a_close() {
        let (a, b) = UnixStream::pair().unwrap();
        // A relay that flips one byte of the third transport message on its way.
        let (relay_in, relay_out) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || accept(relay_out, Some(&key(1)), "frames", T));
        let relay = std::thread::spawn(move || {
            let mut from = b;
            let mut to = relay_in;
            let mut copied = 0usize;
            let mut buf = [0u8; 4096];
            let back_from = to.try_clone().unwrap();
            let back_to = from.try_clone().unwrap();
            std::thread::spawn(move || {
                let (mut f, mut t) = (back_from, back_to);
                let _ = std::io::copy(&mut f, &mut t);
            });
            loop {
                let n = match from.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                for (i, byte) in buf[..n].iter_mut().enumerate() {
                    if copied + i == 200 {
                        *byte ^= 0x01;
                    }
                }
                copied += n;
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        });
        let mut c = connect(a, Some(&key(1)), "frames", T).unwrap();
        let mut acc = t.join().unwrap().unwrap();
        c.writer.write_all(&[5u8; 300]).unwrap();
        c.writer.flush().unwrap();
        let mut got = [0u8; 300];
        let e = acc.reader.read_exact(&mut got).unwrap_err();
        assert!(is_tampered(&e), "{e}");
        drop(c);
        drop(acc);
        relay.join().unwrap();
    }
}
