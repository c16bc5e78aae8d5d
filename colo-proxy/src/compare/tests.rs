//! Unit tests: one or more per rule of docs/compare.md.

use std::time::Duration;

use super::*;
use crate::builder::*;
use crate::clock::ManualClock;
use crate::wire::ipv4::protocol;
use crate::wire::tcp::Flags;

struct T {
    e: Engine<ManualClock>,
    clock: ManualClock,
    out: Collect,
}

impl T {
    fn new() -> T {
        T::with(Config::default())
    }
    fn with(config: Config) -> T {
        let clock = ManualClock::new();
        T { e: Engine::new(config, clock.clone()), clock, out: Collect::default() }
    }
    fn p(&mut self, f: Vec<u8>) -> Push {
        self.e.push(Side::Primary, Frame::new(f), &mut self.out)
    }
    fn s(&mut self, f: Vec<u8>) -> Push {
        self.e.push(Side::Secondary, Frame::new(f), &mut self.out)
    }
    fn released(&self) -> Vec<Vec<u8>> {
        self.out.released().into_iter().map(|f| f.data.clone()).collect()
    }
    fn verdicts(&self) -> Vec<(Side, Verdict)> {
        self.out.frames.iter().map(|(_, d)| (d.side, d.verdict)).collect()
    }
    fn reasons(&self) -> Vec<Reason> {
        self.out.events.iter().map(|m| m.reason).collect()
    }
    fn advance_ms(&self, ms: u64) {
        self.clock.advance(Duration::from_millis(ms));
    }
    fn flush(&mut self) -> FlushSummary {
        self.e.flush(&mut self.out)
    }
}

const REL_P: (Side, Verdict) = (Side::Primary, Verdict::Released);
const DROP_S_MATCHED: (Side, Verdict) = (Side::Secondary, Verdict::Dropped(DropCause::Matched));

/// Same UDP datagram but with another IP ID (the comparison ignores the IP header).
fn udp_with_ident(payload: &[u8], ident: u16) -> Vec<u8> {
    ipv4_frame(VM_IP, CLIENT_IP, protocol::UDP, ident, udp_segment(5000, 7, payload), Some(6))
}

// ---- Classification -------------------------------------------------------------------------

#[test]
fn arp_from_primary_is_released_at_once_and_from_secondary_dropped() {
    let mut t = T::new();
    assert_eq!(t.p(arp_request()), Push::Accepted);
    assert_eq!(t.s(arp_request()), Push::Accepted);
    assert_eq!(t.verdicts(), vec![REL_P, (Side::Secondary, Verdict::Dropped(DropCause::Uncompared))]);
    assert!(t.out.events.is_empty());
    assert_eq!(t.e.stats().passed_uncompared, 2);
    assert_eq!(t.e.held(), [0, 0]);
}

#[test]
fn unparsable_frames_pass_uncompared_and_are_counted() {
    let mut t = T::new();
    t.p(vec![1, 2, 3]);
    let mut bad_ip = udp4(1, 2, b"x");
    bad_ip[14] = 0x4f; // header length beyond the packet
    t.p(bad_ip);
    assert_eq!(t.released().len(), 2);
    assert_eq!(t.e.stats().malformed, 2);
    assert!(t.out.events.is_empty());
}

// ---- UDP, ICMP, other -----------------------------------------------------------------------

#[test]
fn udp_match_releases_primary_and_drops_secondary() {
    let mut t = T::new();
    t.p(udp_with_ident(b"hello", 1));
    assert!(t.out.frames.is_empty(), "primary waits for the secondary");
    t.s(udp_with_ident(b"hello", 999));
    assert_eq!(t.verdicts(), vec![REL_P, DROP_S_MATCHED]);
    assert_eq!(t.released(), vec![udp_with_ident(b"hello", 1)], "the primary's own bytes go out");
    assert!(t.out.events.is_empty());
}

#[test]
fn udp_secondary_first_also_matches() {
    let mut t = T::new();
    t.s(udp4(5000, 7, b"hi"));
    t.p(udp4(5000, 7, b"hi"));
    assert_eq!(t.verdicts(), vec![REL_P, DROP_S_MATCHED]);
}

#[test]
fn udp_payload_difference_holds_both_and_notifies() {
    let mut t = T::new();
    t.p(udp4(5000, 7, b"aaaa"));
    t.s(udp4(5000, 7, b"aaab"));
    assert!(t.out.frames.is_empty());
    assert_eq!(t.reasons(), vec![Reason::Payload]);
    let ev = &t.out.events[0];
    assert_eq!(ev.key.to_string(), "10.0.0.2:5000>10.0.0.1:7");
    assert_eq!(ev.held, 2);
    assert_eq!(t.e.held(), [1, 1]);
}

#[test]
fn udp_size_difference_is_reason_size() {
    let mut t = T::new();
    t.p(udp4(5000, 7, b"aaaa"));
    t.s(udp4(5000, 7, b"aaaaa"));
    assert_eq!(t.reasons(), vec![Reason::Size]);
}

#[test]
fn udp_is_strictly_fifo() {
    let mut t = T::new();
    for i in 0..3u8 {
        t.p(udp4(5000, 7, &[i; 10]));
    }
    for i in 0..3u8 {
        t.s(udp4(5000, 7, &[i; 10]));
    }
    assert_eq!(t.released(), (0..3u8).map(|i| udp4(5000, 7, &[i; 10])).collect::<Vec<_>>());
    assert!(t.out.events.is_empty());
}

#[test]
fn udp_search_finds_a_later_secondary_frame() {
    // The oldest primary frame is searched for in the whole secondary queue.
    let mut t = T::new();
    t.s(udp4(5000, 7, b"late"));
    t.s(udp4(5000, 7, b"first"));
    assert!(t.out.frames.is_empty());
    t.p(udp4(5000, 7, b"first"));
    assert_eq!(t.verdicts(), vec![REL_P, DROP_S_MATCHED]);
    assert_eq!(t.e.held(), [0, 1]);
}

#[test]
fn icmp_ignores_ip_header_and_compares_from_icmp() {
    let mut t = T::new();
    let mut a = icmp4_echo_reply(7, 1, b"ping");
    let b = icmp4_echo_reply(7, 1, b"ping");
    a[14 + 8] = 1; // different TTL
    t.p(a);
    t.s(b);
    assert_eq!(t.verdicts(), vec![REL_P, DROP_S_MATCHED]);
    t.p(icmp4_echo_reply(7, 2, b"ping"));
    t.s(icmp4_echo_reply(7, 3, b"ping"));
    assert_eq!(t.reasons(), vec![Reason::Payload]);
}

#[test]
fn other_protocols_compare_the_whole_frame() {
    let mut t = T::new();
    t.p(ip4_other(protocol::GRE, 5, b"gre-payload"));
    t.s(ip4_other(protocol::GRE, 5, b"gre-payload"));
    assert_eq!(t.verdicts(), vec![REL_P, DROP_S_MATCHED]);
    t.out.clear();
    // The IP ID is part of the comparison for other protocols.
    t.p(ip4_other(protocol::GRE, 6, b"gre-payload"));
    t.s(ip4_other(protocol::GRE, 7, b"gre-payload"));
    assert_eq!(t.reasons(), vec![Reason::Payload]);
}

#[test]
fn fragments_compare_offset_and_data() {
    let frag = |off_units: u16, data: &[u8], ident: u16| {
        let mut f = udp_with_ident(data, ident);
        f[14 + 6..14 + 8].copy_from_slice(&(0x2000 | off_units).to_be_bytes());
        let c = crate::wire::checksum::internet(&{
            let mut h = f[14..34].to_vec();
            h[10] = 0;
            h[11] = 0;
            h
        });
        f[24..26].copy_from_slice(&c.to_be_bytes());
        f
    };
    let mut t = T::new();
    t.p(frag(0, b"part", 1));
    t.s(frag(0, b"part", 2)); // different IP ID, same offset and data
    assert_eq!(t.verdicts(), vec![REL_P, DROP_S_MATCHED]);
    t.p(frag(1, b"part", 1));
    t.s(frag(2, b"part", 1));
    assert_eq!(t.reasons(), vec![Reason::Payload], "fragment offsets differ");
}

// ---- TCP ------------------------------------------------------------------------------------

const ACKED: Option<u32> = Some(5000);

fn seg(seq: u32, payload: &[u8]) -> Vec<u8> {
    tcp4(80, 40000, seq, ACKED, Flags::PSH, payload)
}

#[test]
fn tcp_same_stream_different_segmentation_matches() {
    let data: Vec<u8> = (0..100u8).collect();
    let mut t = T::new();
    t.p(seg(1000, &data));
    t.s(seg(1000, &data[..50]));
    assert!(t.released().is_empty(), "the primary segment is longer: it waits");
    assert_eq!(t.verdicts(), vec![DROP_S_MATCHED]);
    t.s(seg(1050, &data[50..]));
    assert_eq!(t.verdicts(), vec![DROP_S_MATCHED, REL_P, DROP_S_MATCHED]);
    assert!(t.out.events.is_empty());
    assert_eq!(t.e.held(), [0, 0]);
}

#[test]
fn tcp_primary_in_pieces_secondary_whole() {
    let data: Vec<u8> = (0..90u8).collect();
    let mut t = T::new();
    t.s(seg(7, &data));
    for (i, c) in data.chunks(30).enumerate() {
        t.p(seg(7 + 30 * i as u32, c));
    }
    assert_eq!(t.verdicts(), vec![REL_P, REL_P, REL_P, DROP_S_MATCHED]);
    assert!(t.out.events.is_empty());
}

#[test]
fn tcp_payload_difference_notifies_and_holds() {
    let mut t = T::new();
    t.p(seg(1, b"abcdef"));
    t.s(seg(1, b"abcxef"));
    assert_eq!(t.reasons(), vec![Reason::Payload]);
    assert!(t.out.frames.is_empty());
    assert_eq!(t.e.held(), [1, 1]);
}

#[test]
fn tcp_streams_far_apart_are_a_mismatch() {
    // As when the secondary's sequence numbers were never mapped onto the primary's.
    let mut t = T::new();
    t.p(seg(100, b"abcdef"));
    t.s(seg(0x8000_0000, b"abcdef"));
    assert_eq!(t.reasons(), vec![Reason::Payload]);
}

#[test]
fn tcp_secondary_retransmitting_its_past_on_a_flow_met_mid_stream_is_not_waited_for() {
    let mut t = T::new();
    // COLO started mid-connection: the SVM resends its last reply (its ACK reached it late),
    // then both send the next one.
    t.s(seg(1, b"41\n"));
    t.p(seg(4, b"42\n"));
    t.s(seg(4, b"42\n"));
    assert_eq!(t.verdicts(), vec![DROP_S_MATCHED, REL_P, DROP_S_MATCHED]);
    assert!(t.out.events.is_empty(), "no miscompare, nothing left to time out: {:?}", t.out.events);
    assert_eq!(t.e.held(), [0, 0]);
}

#[test]
fn tcp_a_new_pair_after_primary_only_meets_its_flows_afresh() {
    let mut t = T::new();
    // The first pair compares a reply.
    t.p(seg(1, b"41\n"));
    t.s(seg(1, b"41\n"));
    // Its secondary is gone: the primary serves alone, the connection goes on uncompared.
    t.e.set_mode(Mode::PrimaryOnly, &mut t.out);
    t.p(seg(4, b"42\n"));
    t.p(seg(7, b"43\n"));
    // A new secondary, loaded from the primary, resends its last reply (its ACK reached it
    // late), then both send the next one.
    t.e.set_mode(Mode::Colo, &mut t.out);
    let before = t.out.frames.len();
    t.s(seg(7, b"43\n"));
    t.p(seg(10, b"44\n"));
    t.s(seg(10, b"44\n"));
    assert_eq!(t.verdicts()[before..], [DROP_S_MATCHED, REL_P, DROP_S_MATCHED]);
    assert!(t.out.events.is_empty(), "no miscompare, nothing left to time out: {:?}", t.out.events);
    assert_eq!(t.e.held(), [0, 0]);
}

#[test]
fn tcp_passive_and_back_to_colo_keeps_the_pairs_flows() {
    let mut t = T::new();
    t.p(seg(1, b"41\n"));
    t.s(seg(1, b"41\n"));
    // Hybrid mode within one pair: passive, a checkpoint, COLO again. The SVM resumes from the
    // checkpoint, and data compared before is still known as compared.
    t.e.set_mode(Mode::Passive, &mut t.out);
    t.e.set_mode(Mode::Colo, &mut t.out);
    t.p(seg(1, b"41\n"));
    assert_eq!(t.released().len(), 2, "a retransmission of compared data goes out as such");
}

#[test]
fn tcp_small_gap_waits_for_the_missing_segment_then_times_out() {
    let mut t = T::new();
    t.p(seg(100, b"abcdef"));
    t.s(seg(103, b"defghi"));
    assert!(t.out.events.is_empty(), "bytes 100..103 of the secondary may still come");
    t.advance_ms(3000);
    t.e.poll_timeouts(&mut t.out);
    assert_eq!(t.reasons(), vec![Reason::Timeout]);
}

#[test]
fn tcp_retransmissions_are_released_and_dropped_without_comparing() {
    let mut t = T::new();
    t.p(seg(1, b"0123456789"));
    t.s(seg(1, b"0123456789"));
    t.out.clear();
    // Retransmission of compared data on both sides: the primary's goes out at once (the
    // secondary still has a frame), the secondary's is dropped.
    t.s(seg(1, b"0123456789"));
    assert_eq!(t.verdicts(), vec![DROP_S_MATCHED], "nothing left to compare: dropped at once");
    t.p(seg(1, b"0123456789"));
    assert_eq!(t.verdicts(), vec![DROP_S_MATCHED, REL_P]);
    assert!(t.out.events.is_empty());
    assert_eq!(t.e.held(), [0, 0]);
}

#[test]
fn tcp_partial_retransmission_compares_only_new_bytes() {
    let mut t = T::new();
    t.p(seg(1, b"01234"));
    t.s(seg(1, b"01234"));
    t.out.clear();
    // The primary resends 3..5 with new bytes 5..9; the secondary sends 5..9 only.
    t.p(seg(4, b"34NEWB"));
    t.s(seg(6, b"NEWB"));
    assert_eq!(t.verdicts(), vec![REL_P, DROP_S_MATCHED]);
    assert!(t.out.events.is_empty());
}

#[test]
fn tcp_pure_ack_waits_for_a_secondary_frame() {
    let mut t = T::new();
    let ack = tcp4(80, 40000, 1, Some(5000), 0, b"");
    t.p(ack.clone());
    assert!(t.out.frames.is_empty(), "even a pure ACK waits for the secondary");
    t.s(ack.clone());
    assert_eq!(t.verdicts(), vec![DROP_S_MATCHED, REL_P]);
    t.out.clear();
    // The secondary's ACK first: the primary's goes out as soon as it comes.
    t.s(ack.clone());
    t.p(ack);
    assert_eq!(t.verdicts(), vec![DROP_S_MATCHED, REL_P]);
    assert_eq!(t.e.held(), [0, 0], "nothing lingers to time out after a connection's last ACK");
}

#[test]
fn tcp_one_secondary_frame_releases_one_pure_primary_frame() {
    let mut t = T::new();
    t.s(tcp4(80, 40000, 1, Some(5000), 0, b""));
    t.p(tcp4(80, 40000, 1, Some(5000), 0, b""));
    t.p(tcp4(80, 40000, 1, Some(5001), 0, b""));
    assert_eq!(t.released().len(), 1);
    assert_eq!(t.e.held(), [1, 0]);
}

#[test]
fn tcp_ack_beyond_secondary_is_a_mismatch() {
    let mut t = T::new();
    t.p(tcp4(80, 40000, 1, Some(6000), 0, b"data"));
    t.s(tcp4(80, 40000, 1, Some(5000), 0, b"data"));
    assert_eq!(t.reasons(), vec![Reason::Ack]);
    assert!(t.released().is_empty());
    // Once the secondary's ACK catches up, the frame can go.
    t.s(tcp4(80, 40000, 5, Some(6000), 0, b""));
    assert_eq!(t.released().len(), 1);
}

#[test]
fn tcp_ack_trackers_keep_the_largest_wrap_aware() {
    let mut t = T::new();
    // The secondary acknowledged 0xffff_fff0 + 0x20 (wrapped to 0x10), then an older ACK.
    t.s(tcp4(80, 40000, 1, Some(0x10), 0, b""));
    t.s(tcp4(80, 40000, 1, Some(0xffff_fff0), 0, b""));
    t.p(tcp4(80, 40000, 1, Some(0x10), 0, b"data"));
    t.s(tcp4(80, 40000, 1, Some(0xffff_fff0), 0, b"data"));
    assert!(t.out.events.is_empty(), "the largest ACK is 0x10, not the last one");
    assert_eq!(t.released().len(), 1);
}

#[test]
fn tcp_queue_is_sorted_by_sequence_number() {
    let mut t = T::new();
    t.p(seg(1, b"aaaa"));
    t.p(seg(5, b"bbbb"));
    // The secondary's segments arrive out of order; the queue reorders them.
    t.s(seg(5, b"bbbb"));
    assert!(t.released().is_empty());
    t.s(seg(1, b"aaaa"));
    assert_eq!(t.released(), vec![seg(1, b"aaaa"), seg(5, b"bbbb")]);
    assert!(t.out.events.is_empty());
}

#[test]
fn tcp_sequence_wraps() {
    let mut t = T::new();
    t.p(seg(0xffff_fffe, b"wxyz"));
    t.s(seg(0xffff_fffe, b"wx"));
    t.s(seg(0, b"yz"));
    assert_eq!(t.released().len(), 1);
    assert!(t.out.events.is_empty());
}

#[test]
fn tcp_fully_consumed_secondary_is_dropped_at_once() {
    let mut t = T::new();
    t.p(seg(1, b"abcd"));
    t.s(seg(1, b"abcd"));
    assert_eq!(t.e.held(), [0, 0], "QEMU would keep the secondary frame until the next primary one");
}

#[test]
fn tcp_primary_after_flush_is_compared_from_flushed_end() {
    let mut t = T::new();
    t.p(seg(1, b"abcd"));
    t.s(seg(1, b"abXd"));
    t.flush();
    t.out.clear();
    // After the checkpoint the secondary resends bytes the primary already flushed: dropped.
    t.s(seg(1, b"abcd"));
    t.p(seg(5, b"next"));
    t.s(seg(5, b"next"));
    assert_eq!(t.verdicts(), vec![DROP_S_MATCHED, REL_P, DROP_S_MATCHED]);
    assert!(t.out.events.is_empty());
}

// ---- Timeouts -------------------------------------------------------------------------------

#[test]
fn held_frame_times_out_after_compare_timeout_at_a_scan() {
    let mut t = T::new();
    t.p(udp4(1, 2, b"lonely"));
    assert!(t.e.next_deadline().is_some());
    t.advance_ms(1000);
    t.e.poll_timeouts(&mut t.out);
    t.advance_ms(1000);
    t.e.poll_timeouts(&mut t.out);
    t.advance_ms(999);
    t.e.poll_timeouts(&mut t.out);
    assert!(t.out.events.is_empty(), "2.999 s is not yet 3 s");
    t.advance_ms(1);
    t.e.poll_timeouts(&mut t.out);
    assert_eq!(t.reasons(), vec![Reason::Timeout]);
    t.advance_ms(999);
    t.e.poll_timeouts(&mut t.out);
    assert_eq!(t.e.stats().miscompares.timeout, 1, "no scan before the next cycle");
    t.advance_ms(1);
    t.e.poll_timeouts(&mut t.out);
    assert_eq!(t.e.stats().miscompares.timeout, 2, "still held at the next scan");
    assert_eq!(t.out.events.len(), 1, "rate-limited until the reminder period");
    assert!(t.out.frames.is_empty(), "a timeout only requests a checkpoint");
}

#[test]
fn secondary_frames_time_out_too() {
    let mut t = T::new();
    t.s(udp4(1, 2, b"only on the secondary"));
    t.advance_ms(3000);
    t.e.poll_timeouts(&mut t.out);
    assert_eq!(t.reasons(), vec![Reason::Timeout]);
}

#[test]
fn scans_do_nothing_before_their_cycle() {
    let mut t = T::with(Config { compare_timeout: Duration::from_millis(10), ..Config::default() });
    t.p(udp4(1, 2, b"x"));
    t.advance_ms(500);
    t.e.poll_timeouts(&mut t.out);
    assert!(t.out.events.is_empty(), "first scan is one expired_scan_cycle after start");
    t.advance_ms(500);
    t.e.poll_timeouts(&mut t.out);
    assert_eq!(t.reasons(), vec![Reason::Timeout]);
}

#[test]
fn nothing_held_means_no_deadline() {
    let mut t = T::new();
    assert_eq!(t.e.next_deadline(), None);
    t.p(udp4(1, 2, b"x"));
    t.s(udp4(1, 2, b"x"));
    assert_eq!(t.e.next_deadline(), None);
}

// ---- Limits and backpressure ----------------------------------------------------------------

#[test]
fn full_queue_hands_the_frame_back_and_notifies_once() {
    let mut t = T::with(Config { max_queue_size: 3, ..Config::default() });
    for i in 0..3u8 {
        assert_eq!(t.p(udp4(1, 2, &[i])), Push::Accepted);
    }
    let fourth = udp4(1, 2, &[3]);
    assert_eq!(t.p(fourth.clone()), Push::Full(Frame::new(fourth.clone())));
    assert_eq!(t.p(fourth.clone()), Push::Full(Frame::new(fourth.clone())));
    assert_eq!(t.reasons(), vec![Reason::QueueFull]);
    assert_eq!(t.e.stats().frames_primary, 3, "refused offers are not counted as frames");
    assert_eq!(t.e.stats().miscompares.queue_full, 1, "a retry of the same full queue is not a new inconsistency");
    t.flush();
    assert_eq!(t.p(fourth), Push::Accepted, "room after the flush");
}

#[test]
fn overflow_discard_is_counted() {
    let mut t = T::with(Config { max_queue_size: 1, ..Config::default() });
    t.p(udp4(1, 2, b"a"));
    let Push::Full(f) = t.p(udp4(1, 2, b"b")) else { panic!("expected a full queue") };
    t.e.discard_overflow(Side::Primary, f, &mut t.out);
    assert_eq!(t.e.stats().dropped_overflow, 1);
    assert_eq!(t.verdicts(), vec![(Side::Primary, Verdict::Dropped(DropCause::Overflow))]);
}

#[test]
fn byte_budget_spans_all_flows_hands_the_frame_back_and_notifies_once() {
    let len = udp4(1, 2, b"a").len();
    let mut t = T::with(Config { max_queue_bytes: 3 * len, ..Config::default() });
    // Three flows, one frame each: the budget is for all flows together.
    for port in 1..=3 {
        assert_eq!(t.p(udp4(port, 2, b"a")), Push::Accepted);
    }
    assert_eq!(t.e.held_bytes(), [3 * len, 0]);
    let fourth = udp4(4, 2, b"a");
    assert_eq!(t.p(fourth.clone()), Push::Full(Frame::new(fourth.clone())));
    assert_eq!(t.p(fourth.clone()), Push::Full(Frame::new(fourth.clone())));
    assert_eq!(t.reasons(), vec![Reason::QueueFull]);
    assert_eq!(
        t.e.stats().miscompares.queue_full,
        1,
        "a retry against the same full budget is not a new inconsistency"
    );
    assert_eq!(t.e.stats().frames_primary, 3, "refused offers are not counted as frames");
    assert_eq!(t.e.stats().flows, 3, "a refused frame makes no flow");
    assert_eq!(t.flush(), FlushSummary { released: 3, dropped: 0 });
    assert_eq!(t.e.held_bytes(), [0, 0]);
    assert_eq!(t.p(fourth), Push::Accepted, "room after the flush");
}

#[test]
fn byte_budget_is_per_side_so_the_secondary_can_still_match_and_make_room() {
    let len = udp4(1, 2, b"a").len();
    let mut t = T::with(Config { max_queue_bytes: 2 * len, ..Config::default() });
    t.p(udp4(1, 2, b"a"));
    t.p(udp4(1, 2, b"b"));
    assert!(matches!(t.p(udp4(1, 2, b"c")), Push::Full(_)));
    // The secondary's budget is its own: its frames match the held ones and release them.
    assert_eq!(t.s(udp4(1, 2, b"a")), Push::Accepted);
    assert_eq!(t.s(udp4(1, 2, b"b")), Push::Accepted);
    assert_eq!(t.released(), vec![udp4(1, 2, b"a"), udp4(1, 2, b"b")]);
    assert_eq!(t.e.held_bytes(), [0, 0], "released and matched frames leave the budget");
    assert_eq!(t.p(udp4(1, 2, b"c")), Push::Accepted);
}

#[test]
fn a_frame_larger_than_the_byte_budget_is_taken_when_nothing_is_held() {
    let mut t = T::with(Config { max_queue_bytes: 10, ..Config::default() });
    assert_eq!(t.p(udp4(1, 2, b"big")), Push::Accepted, "else it could never pass");
    assert!(matches!(t.p(udp4(1, 2, b"next")), Push::Full(_)));
    assert_eq!(t.s(udp4(1, 2, b"big")), Push::Accepted);
    assert_eq!(t.released(), vec![udp4(1, 2, b"big")]);
    assert_eq!(t.p(udp4(1, 2, b"next")), Push::Accepted);
}

#[test]
fn byte_budget_in_passive_mode_pushes_back_without_a_checkpoint_request() {
    let len = udp4(1, 2, b"a").len();
    let mut t = T::with(Config { max_queue_bytes: 2 * len, ..Config::default() });
    t.e.set_mode(Mode::Passive, &mut t.out);
    t.p(udp4(1, 2, b"a"));
    t.p(udp4(3, 4, b"b"));
    assert!(matches!(t.p(udp4(5, 6, b"c")), Push::Full(_)));
    assert!(t.out.events.is_empty(), "passive checkpoints come on the controller's schedule");
    t.flush();
    assert_eq!(t.released(), vec![udp4(1, 2, b"a"), udp4(3, 4, b"b")]);
    assert_eq!(t.p(udp4(5, 6, b"c")), Push::Accepted);
}

#[test]
fn flow_table_evicts_idle_flows_but_never_held_ones() {
    let mut t = T::with(Config { max_flows: 4, ..Config::default() });
    for port in 0..4 {
        t.p(udp4(port, 9, b"x"));
        t.s(udp4(port, 9, b"x"));
    }
    assert_eq!(t.e.stats().flows, 4);
    // All four are idle: a fifth flow evicts the least recently active.
    t.p(udp4(100, 9, b"held"));
    assert_eq!(t.e.stats().flows_evicted, 1);
    // Fill the table with flows that hold frames.
    for port in 101..104 {
        t.p(udp4(port, 9, b"held"));
    }
    let extra = udp4(200, 9, b"no room");
    assert!(matches!(t.p(extra), Push::Full(_)), "held frames are never discarded to make room");
    assert_eq!(t.e.held(), [4, 0]);
    assert_eq!(t.reasons(), vec![Reason::QueueFull]);
}

// ---- Notify rate limit ----------------------------------------------------------------------

#[test]
fn notifies_are_rate_limited_until_the_flush() {
    let mut t = T::new();
    t.p(udp4(1, 2, b"a"));
    t.s(udp4(1, 2, b"b"));
    t.p(udp4(3, 4, b"c"));
    t.s(udp4(3, 4, b"d"));
    assert_eq!(t.out.events.len(), 1);
    assert_eq!(t.e.stats().miscompares.payload, 2);
    let s = t.flush();
    assert_eq!(s, FlushSummary { released: 2, dropped: 2 });
    t.p(udp4(1, 2, b"e"));
    t.s(udp4(1, 2, b"f"));
    assert_eq!(t.out.events.len(), 2);
    assert_eq!(t.out.events[1].suppressed, 1);
}

// ---- Flush ----------------------------------------------------------------------------------

#[test]
fn flush_releases_tcp_by_sequence_and_others_by_arrival() {
    let mut t = T::new();
    t.p(udp4(1, 2, b"u1"));
    t.p(seg(20, b"second"));
    t.p(udp4(3, 4, b"u2"));
    t.p(seg(10, b"first"));
    t.p(udp4(1, 2, b"u3"));
    t.s(udp4(9, 9, b"secondary"));
    let s = t.flush();
    assert_eq!(s, FlushSummary { released: 5, dropped: 1 });
    // The TCP flow's stream is ready to go once "first" (arrival 3) is there; "second" then
    // follows at once, before the later-arriving u3.
    assert_eq!(
        t.released(),
        vec![udp4(1, 2, b"u1"), udp4(3, 4, b"u2"), seg(10, b"first"), seg(20, b"second"), udp4(1, 2, b"u3")]
    );
    assert_eq!(t.e.held(), [0, 0]);
    assert_eq!(t.e.stats().flushes, 1);
}

#[test]
fn flush_marks_miscompared_frames() {
    let mut t = T::new();
    t.p(udp4(1, 2, b"a"));
    t.s(udp4(1, 2, b"b"));
    t.flush();
    let marks: Vec<_> = t.out.frames.iter().map(|(_, d)| (d.side, d.verdict, d.miscompare)).collect();
    assert_eq!(
        marks,
        vec![
            (Side::Primary, Verdict::Released, Some(Reason::Payload)),
            (Side::Secondary, Verdict::Dropped(DropCause::Flushed), Some(Reason::Payload)),
        ]
    );
}

// ---- Modes ----------------------------------------------------------------------------------

#[test]
fn passive_holds_primary_until_flush_drops_secondary_and_never_times_out() {
    let mut t = T::new();
    t.e.set_mode(Mode::Passive, &mut t.out);
    t.p(udp4(1, 2, b"a"));
    t.p(arp_request());
    t.s(udp4(1, 2, b"a"));
    assert_eq!(t.verdicts(), vec![(Side::Secondary, Verdict::Dropped(DropCause::Mode))]);
    assert_eq!(t.e.next_deadline(), None);
    t.advance_ms(10_000);
    t.e.poll_timeouts(&mut t.out);
    assert!(t.out.events.is_empty());
    t.out.clear();
    t.flush();
    assert_eq!(t.released(), vec![udp4(1, 2, b"a"), arp_request()], "output commit, arrival order");
}

#[test]
fn primary_only_releases_held_and_then_everything() {
    let mut t = T::new();
    t.p(udp4(1, 2, b"held"));
    t.s(udp4(5, 6, b"held too"));
    t.e.set_mode(Mode::PrimaryOnly, &mut t.out);
    assert_eq!(t.verdicts(), vec![REL_P, (Side::Secondary, Verdict::Dropped(DropCause::Mode))]);
    t.out.clear();
    t.p(udp4(1, 2, b"now"));
    t.s(udp4(1, 2, b"now"));
    assert_eq!(t.verdicts(), vec![REL_P, (Side::Secondary, Verdict::Dropped(DropCause::Mode))]);
}

#[test]
fn secondary_only_releases_held_secondary_and_drops_primary() {
    let mut t = T::new();
    t.p(udp4(1, 2, b"p"));
    t.s(udp4(5, 6, b"s"));
    t.e.set_mode(Mode::SecondaryOnly, &mut t.out);
    assert_eq!(
        t.verdicts(),
        vec![(Side::Secondary, Verdict::Released), (Side::Primary, Verdict::Dropped(DropCause::Mode))]
    );
    t.out.clear();
    t.s(udp4(1, 2, b"s2"));
    t.p(udp4(1, 2, b"p2"));
    t.s(arp_request());
    assert_eq!(
        t.verdicts(),
        vec![
            (Side::Secondary, Verdict::Released),
            (Side::Primary, Verdict::Dropped(DropCause::Mode)),
            (Side::Secondary, Verdict::Released)
        ]
    );
}

#[test]
fn mode_names_round_trip() {
    for m in [Mode::Colo, Mode::Passive, Mode::PrimaryOnly, Mode::SecondaryOnly] {
        assert_eq!(m.name().parse::<Mode>().unwrap(), m);
        assert_eq!(serde_json::to_string(&m).unwrap(), format!("\"{}\"", m.name()));
    }
    assert!("bogus".parse::<Mode>().is_err());
}

// ---- IPv6 and VLAN --------------------------------------------------------------------------

#[test]
fn ipv6_is_compared() {
    let mut t = T::new();
    t.p(udp6(9, 10, b"same"));
    t.s(udp6(9, 10, b"same"));
    assert_eq!(t.verdicts(), vec![REL_P, DROP_S_MATCHED]);
    t.p(udp6(9, 10, b"diff"));
    t.s(udp6(9, 10, b"DIFF"));
    assert_eq!(t.reasons(), vec![Reason::Payload], "QEMU would pass IPv6 through uncompared");
    t.flush();
    t.out.clear();
    t.p(tcp6(80, 4000, 1, Some(1), 0, b"stream"));
    t.s(tcp6(80, 4000, 1, Some(1), 0, b"str"));
    t.s(tcp6(80, 4000, 4, Some(1), 0, b"eam"));
    assert_eq!(t.released().len(), 1);
    t.p(icmp6(129, b"\0\x01\0\x01echo"));
    t.s(icmp6(129, b"\0\x01\0\x01echo"));
    assert_eq!(t.released().len(), 2);
}

#[test]
fn neighbour_discovery_is_not_compared() {
    let mut t = T::new();
    t.p(icmp6(136, b"\0\0\0\0advert"));
    assert_eq!(t.verdicts(), vec![REL_P]);
}

#[test]
fn vlan_frames_compare_inside_and_tags_must_match() {
    let mut t = T::new();
    t.p(vlan_tagged(&udp4(1, 2, b"v"), 10));
    t.s(vlan_tagged(&udp4(1, 2, b"v"), 10));
    assert_eq!(t.verdicts(), vec![REL_P, DROP_S_MATCHED]);
    t.out.clear();
    t.p(vlan_tagged(&udp4(1, 2, b"v"), 10));
    t.s(vlan_tagged(&udp4(1, 2, b"v"), 20));
    assert!(t.out.frames.is_empty(), "different tags are different flows");
    t.p(vlan_tagged(&udp4(1, 2, b"x"), 30));
    t.s(vlan_tagged(&udp4(1, 2, b"y"), 30));
    assert_eq!(t.reasons(), vec![Reason::Payload]);
}

// ---- Statistics -----------------------------------------------------------------------------

#[test]
fn stats_count_frames_and_hold_times() {
    let mut t = T::new();
    t.p(udp4(1, 2, b"a"));
    t.advance_ms(2);
    t.s(udp4(1, 2, b"a"));
    t.p(udp4(1, 2, b"b"));
    t.advance_ms(10);
    t.s(udp4(1, 2, b"b"));
    let s = t.e.stats();
    assert_eq!((s.frames_primary, s.frames_secondary, s.released, s.dropped_secondary), (2, 2, 2, 2));
    assert_eq!(s.max_hold_us, 10_000);
    assert!((1990..=2010).contains(&s.hold_p50_us), "p50 {}", s.hold_p50_us);
    assert!((9900..=10100).contains(&s.hold_p99_us), "p99 {}", s.hold_p99_us);
    assert_eq!(s.flows, 1);
}
