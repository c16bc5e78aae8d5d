//! Stopping every ring of a vhost-user backend in one round trip.
//!
//! The vhost crate's frontend sends a `GET_VRING_BASE` and waits for its answer before the next
//! one; at a checkpoint's pause each round trip through vhost-net-compare's relay costs four
//! thread wake-ups, and the PVM is paused meanwhile. A backend reads its socket one request at
//! a time and answers in order, so the requests for all rings can go out in one write and the
//! answers be read after: the rings stop in about one round trip.

use std::io::{self, Read, Write};
use std::mem::{size_of, ManuallyDrop};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;

use vhost::vhost_user::message::{FrontendReq, VhostUserHeaderFlag, VhostUserVringState};
use vhost::vhost_user::Error as ProtocolError;
use vm_memory::ByteValued;

/// A message header: request, flags, payload size (`u32` each, the machine's byte order).
const HEADER: usize = 12;
/// Protocol version 1 in the flags.
const VERSION: u32 = 0x1;
/// The request and its answer: header and ring state.
const MESSAGE: usize = HEADER + size_of::<VhostUserVringState>();

fn header(flags: u32) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    let words = [u32::from(FrontendReq::GET_VRING_BASE), flags, size_of::<VhostUserVringState>() as u32];
    for (chunk, w) in h.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&w.to_ne_bytes());
    }
    h
}

/// Stops `queues` on the backend at the other end of `socket` (a frontend's connection, which
/// nothing else may use meanwhile) and returns where each ring stands (its next available
/// index), in the order of `queues`. An error names the ring whose answer failed (the first
/// ring if the requests could not be sent).
pub fn get_vring_bases(socket: &impl AsRawFd, queues: &[usize]) -> Result<Vec<u32>, (usize, vhost::Error)> {
    // SAFETY: the descriptor stays open while `socket` is borrowed, and ManuallyDrop keeps
    // this handle from closing it.
    let mut stream = ManuallyDrop::new(unsafe { UnixStream::from_raw_fd(socket.as_raw_fd()) });
    let first = queues.first().copied().unwrap_or_default();
    let mut requests = Vec::with_capacity(queues.len() * MESSAGE);
    for &q in queues {
        let index = u32::try_from(q).map_err(|_| (q, protocol(ProtocolError::InvalidParam)))?;
        // No NEED_REPLY: GET_VRING_BASE is always answered, with the ring's state.
        requests.extend_from_slice(&header(VERSION));
        requests.extend_from_slice(VhostUserVringState::new(index, 0).as_slice());
    }
    stream.write_all(&requests).map_err(|e| (first, broken(e)))?;
    let answer = |&q: &usize| {
        let mut answer = [0u8; MESSAGE];
        stream.read_exact(&mut answer).map_err(|e| (q, broken(e)))?;
        parse_answer(&answer, q).map_err(|e| (q, protocol(e)))
    };
    queues.iter().map(answer).collect()
}

/// The ring state in a `GET_VRING_BASE` answer for ring `queue`.
fn parse_answer(answer: &[u8; MESSAGE], queue: usize) -> Result<u32, ProtocolError> {
    let (head, body) = answer.split_at(HEADER);
    // Copied out: the bytes need not be aligned for the type.
    let mut state = VhostUserVringState::default();
    state.as_mut_slice().copy_from_slice(body);
    match head == header(VERSION | VhostUserHeaderFlag::REPLY.bits()) && state.index as usize == queue {
        true => Ok(state.num),
        false => Err(ProtocolError::InvalidMessage),
    }
}

fn protocol(e: ProtocolError) -> vhost::Error {
    vhost::Error::VhostUserProtocol(e)
}

fn broken(e: io::Error) -> vhost::Error {
    protocol(ProtocolError::SocketBroken(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(request: u32, flags: u32, size: u32, index: u32, num: u32) -> [u8; MESSAGE] {
        let mut a = [0u8; MESSAGE];
        for (i, w) in [request, flags, size, index, num].into_iter().enumerate() {
            a[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        a
    }

    /// A backend's end of the socket: checks the two pipelined requests, then answers them.
    fn backend(mut peer: UnixStream, answers: Vec<[u8; MESSAGE]>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut asked = vec![0u8; 2 * MESSAGE];
            peer.read_exact(&mut asked).unwrap();
            for a in answers {
                peer.write_all(&a).unwrap();
            }
            asked
        })
    }

    #[test]
    fn both_requests_go_out_before_the_answers_are_read() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        // The backend answers only once it has both requests: one request at a time would time out.
        ours.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        let code = u32::from(FrontendReq::GET_VRING_BASE);
        let b = backend(theirs, vec![answer(code, 0x5, 8, 0, 17), answer(code, 0x5, 8, 1, 4)]);
        assert_eq!(get_vring_bases(&ours, &[0, 1]).unwrap(), vec![17, 4]);
        let asked = b.join().unwrap();
        assert_eq!(asked[..MESSAGE], answer(code, 0x1, 8, 0, 0));
        assert_eq!(asked[MESSAGE..], answer(code, 0x1, 8, 1, 0));
    }

    #[test]
    fn wrong_answers_are_refused_and_name_their_ring() {
        let code = u32::from(FrontendReq::GET_VRING_BASE);
        for (bad, why) in [
            (answer(code, 0x1, 8, 1, 4), "not a reply"),
            (answer(code + 1, 0x5, 8, 1, 4), "another request's reply"),
            (answer(code, 0x5, 4, 1, 4), "wrong size"),
            (answer(code, 0x5, 8, 0, 4), "another ring"),
            (answer(code, 0x6, 8, 1, 4), "wrong version"),
        ] {
            let (ours, theirs) = UnixStream::pair().unwrap();
            let b = backend(theirs, vec![answer(code, 0x5, 8, 0, 17), bad]);
            match get_vring_bases(&ours, &[0, 1]) {
                Err((1, vhost::Error::VhostUserProtocol(ProtocolError::InvalidMessage))) => {}
                other => panic!("{why}: {other:?}"),
            }
            b.join().unwrap();
        }
    }

    #[test]
    fn a_backend_that_hangs_up_is_a_broken_socket() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let code = u32::from(FrontendReq::GET_VRING_BASE);
        // One answer and half of the next, then gone.
        let half = answer(code, 0x5, 8, 1, 4);
        let b = std::thread::spawn(move || {
            let mut theirs = theirs;
            let mut asked = vec![0u8; 2 * MESSAGE];
            theirs.read_exact(&mut asked).unwrap();
            theirs.write_all(&answer(code, 0x5, 8, 0, 17)).unwrap();
            theirs.write_all(&half[..7]).unwrap();
        });
        match get_vring_bases(&ours, &[0, 1]) {
            Err((1, vhost::Error::VhostUserProtocol(ProtocolError::SocketBroken(_)))) => {}
            other => panic!("{other:?}"),
        }
        b.join().unwrap();
    }
}
